"""The provider seam: one narrow interface behind which every upstream sits."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from flux_proxy.config import ConfigError

if TYPE_CHECKING:
    from flux_proxy.capabilities import Capabilities
    from flux_proxy.config import ProviderConfig
    from flux_proxy.runtime import Runtime
    from flux_proxy.schema import GeneratedImage, ImageJob


class Provider(Protocol):
    """Turns one normalised job into images through the provider's native protocol.

    ``generate`` receives a job the middlewares have already fitted to the model's
    capabilities: a size it can make, at most ``max_images_per_call`` images, a
    format it returns natively. It records how it passed on ``prompt`` and
    ``seed`` in ``job.report``.

    A provider may also set ``default_model``: the upstream model used when a
    config entry names none (otherwise the public model name is sent).
    """

    name: str

    def capabilities(self, model: ProviderConfig) -> Capabilities: ...

    def description(self, model: ProviderConfig) -> str: ...

    async def generate(self, job: ImageJob) -> list[GeneratedImage]: ...


ProviderFactory = Callable[["Runtime"], Provider]


class ProviderOptions(BaseModel):
    """The options every provider's model entry takes; a provider subclasses it for its own."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # More hosts the provider key may be sent to when an upstream's answer names them
    # (exact names, or "*.example.com"); see flux_proxy/hosts.py.
    trusted_hosts: tuple[str, ...] = ()

    @field_validator("trusted_hosts")
    @classmethod
    def _host_patterns(cls, hosts: tuple[str, ...]) -> tuple[str, ...]:
        for host in hosts:
            wildcard = host.startswith("*.")
            name = host.removeprefix("*.")
            # "*.com" would trust a whole top-level domain: a wildcard needs a dot below it.
            bad_wildcard = wildcard and "." not in name
            if not name or bad_wildcard or any(char in name for char in "/:*@ "):
                raise ValueError(f"{host!r} is not a host name or a *.domain pattern")
        return hosts


Options = TypeVar("Options", bound=BaseModel)


def provider_options(model: type[Options], config: ProviderConfig) -> Options:
    """A model entry's ``options``, validated; a ConfigError names the bad key.

    Providers call it from ``capabilities()`` so a typo fails at startup, where
    the router adds which model the entry belongs to.
    """
    try:
        return model.model_validate(config.options)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in ("options", *first["loc"]))
        raise ConfigError(f"{where}: {first['msg']}") from None
