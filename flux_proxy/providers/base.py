"""The provider seam: one narrow interface behind which every upstream sits, and the
base class (:class:`UpstreamProvider`) that gives a provider its key, base URL,
options and upstream line the same way for all."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, ClassVar, Generic, Protocol, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from flux_proxy.capabilities import Capabilities
from flux_proxy.config import ConfigError, ProviderConfig
from flux_proxy.errors import GatewayError
from flux_proxy.hosts import KeyHosts
from flux_proxy.schema import GeneratedImage, ImageJob, Progress, ignore_progress
from flux_proxy.upstream import Upstream

if TYPE_CHECKING:
    from flux_proxy.runtime import Runtime


class Provider(Protocol):
    """Turns one normalised job into images through the provider's native protocol.

    ``generate`` receives a job the middlewares have already fitted to the model's
    capabilities: a size it can make, at most ``max_images_per_call`` images, a
    format it returns natively. It records how it passed on ``prompt`` and
    ``seed`` in ``job.report``. ``check`` refuses (GatewayError) a job the provider
    would refuse, without calling anything: a streaming request runs it before it
    commits to a 200.

    A provider may also set ``default_model``: the upstream model used when a
    config entry names none (otherwise the public model name is sent).
    """

    @property
    def name(self) -> str: ...

    def capabilities(self, model: ProviderConfig) -> Capabilities: ...

    def description(self, model: ProviderConfig) -> str: ...

    def check(self, job: ImageJob) -> None: ...

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

    ``UpstreamProvider.entry`` calls it once per entry, at start-up, where the
    router adds which model the entry belongs to.
    """
    try:
        return model.model_validate(config.options)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in ("options", *first["loc"]))
        raise ConfigError(f"{where}: {first['msg']}") from None


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """What a provider knows about one of its upstream models; subclass to add fields."""

    capabilities: Capabilities
    title: str = ""  # for GET /v1/models, e.g. "FLUX 1.1 [pro] via Black Forest Labs' API"


SpecT = TypeVar("SpecT", bound=ModelSpec)
OptionsT = TypeVar("OptionsT", bound=ProviderOptions)


@dataclass(frozen=True)
class ModelEntry(Generic[SpecT, OptionsT]):
    """One config entry of a provider, checked once at start-up."""

    config: ProviderConfig
    upstream_model: str
    spec: SpecT
    options: OptionsT
    base_url: str
    key_env: str | None
    hosts: KeyHosts


class UpstreamProvider(Generic[SpecT, OptionsT]):
    """Base of a provider that calls an upstream with a key, like llm's ``KeyModel``.

    A subclass declares, as class attributes: ``name``; ``key_env`` (the variable
    holding the key unless the entry's ``api_key_env`` names another; None: no key
    unless it does), ``key_header`` and ``key_prefix`` (how the key is sent);
    ``base_url``; ``key_hosts`` (the hosts besides ``base_url``'s origin that get
    the key when an answer names them); ``options_model``; ``models`` (upstream
    model id -> :class:`ModelSpec`) and ``default_model``. Each config entry is
    checked once, at start-up: options, model, base URL. The subclass implements
    :meth:`run`; :meth:`generate` around it takes the key out of everything that
    leaves the provider (errors, progress, revised prompts).
    """

    name: ClassVar[str]
    key_env: ClassVar[str | None] = None
    key_header: ClassVar[str] = "Authorization"
    key_prefix: ClassVar[str] = "Bearer "
    base_url: ClassVar[str]
    # Path suffixes a configured base_url may end with that the provider adds itself.
    base_url_suffixes: ClassVar[tuple[str, ...]] = ()
    key_hosts: ClassVar[tuple[str, ...]] = ()
    default_model: ClassVar[str | None] = None
    options_model: type[OptionsT]
    models: Mapping[str, SpecT]

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        # Entries by config object; the config is kept so its id cannot be reused.
        self._entries: dict[int, tuple[ProviderConfig, ModelEntry[SpecT, OptionsT]]] = {}

    # --- start-up -------------------------------------------------------------------

    def entry(self, config: ProviderConfig) -> ModelEntry[SpecT, OptionsT]:
        """The checked entry (built on first use: at start-up, by ``capabilities``)."""
        cached = self._entries.get(id(config))
        if cached is not None and cached[0] is config:
            return cached[1]
        options = provider_options(self.options_model, config)
        upstream_model = config.upstream_model or self.default_model or ""
        base_url = (config.base_url or self.default_base_url(options)).rstrip("/")
        for suffix in self.base_url_suffixes:
            base_url = base_url.removesuffix(suffix)
        entry = ModelEntry(
            config=config,
            upstream_model=upstream_model,
            spec=self.model_spec(upstream_model, options),
            options=options,
            base_url=base_url,
            key_env=config.api_key_env or self.key_env,
            hosts=KeyHosts(self.name, (*self.key_hosts, *options.trusted_hosts), base_url),
        )
        self._entries[id(config)] = (config, entry)
        return entry

    def default_base_url(self, options: OptionsT) -> str:
        """The base URL when the entry gives none (one that depends on options: override)."""
        return self.base_url

    def model_spec(self, upstream_model: str, options: OptionsT) -> SpecT:
        """The spec of ``upstream_model``; a ConfigError for a model the provider lacks."""
        spec = self.models.get(upstream_model)
        if spec is None:
            raise ConfigError(unknown_model_message(self.name, upstream_model, self.models))
        return spec

    def capabilities(self, model: ProviderConfig) -> Capabilities:
        return self.entry(model).spec.capabilities

    def description(self, model: ProviderConfig) -> str:
        entry = self.entry(model)
        return entry.spec.title or f"{entry.upstream_model} via {self.name}"

    # --- a request ------------------------------------------------------------------

    def check(self, job: ImageJob) -> None:
        """Refuse a job this provider cannot serve (before anything is sent)."""
        del job

    async def run(
        self, job: ImageJob, entry: ModelEntry[SpecT, OptionsT], upstream: Upstream
    ) -> list[GeneratedImage]:
        """The provider's own protocol: send the job through ``upstream``, return images."""
        raise NotImplementedError

    async def generate(self, job: ImageJob) -> list[GeneratedImage]:
        self.check(job)
        entry = self.entry(job.target.config)
        upstream = self.upstream(job, entry)
        sink = job.progress
        if sink is not ignore_progress:  # nothing to redact where it goes nowhere: no copy

            async def redacted(progress: Progress) -> None:
                await sink(replace(progress, status=upstream.redact(progress.status, limit=100)))

            job = replace(job, progress=redacted)
        try:
            images = await self.run(job, entry, upstream)
        except GatewayError as error:
            raise upstream.scrub(error) from None
        for image in images:
            if image.revised_prompt is not None:
                image.revised_prompt = upstream.redact(image.revised_prompt, limit=None)
        return images

    async def image_at(
        self, url: str, seed: int | None = None, width: int | None = None, height: int | None = None
    ) -> GeneratedImage:
        """The image an answer names: a URL the core fetches when it needs the bytes, or a
        ``data:`` URI whose base64 text is kept (size-capped, undecoded: passed on as it is
        where nothing changes), so that no data: URI travels further."""
        if url.startswith("data:"):
            text = self.runtime.fetcher.data_uri_text(url)
            return GeneratedImage(b64=text, seed=seed, width=width, height=height)
        return GeneratedImage(url=url, seed=seed, width=width, height=height)

    def upstream(self, job: ImageJob, entry: ModelEntry[SpecT, OptionsT]) -> Upstream:
        """The line to the upstream for one call: key (502 naming the variable if unset)."""
        runtime = self.runtime
        key = runtime.upstream_key(entry.key_env) if entry.key_env else None
        max_fetch = runtime.settings.limits.max_fetch_bytes
        return Upstream(
            provider=self.name,
            http=runtime.http,
            send=runtime.exchange,
            build=runtime.build_request,
            key=key,
            auth={self.key_header: f"{self.key_prefix}{key}"} if key else {},
            hosts=entry.hosts,
            guard=runtime.fetcher.check_url,
            # n images inline as base64 (sync answers, data: URIs) plus the JSON around them.
            max_bytes=(max_fetch * 4 // 3 + 65536) * max(job.n, 1),
            reads=runtime.reads,
            deadlines=runtime.deadlines,
        )


def unknown_model_message(provider: str, upstream_model: str, known: Iterable[str]) -> str:
    """The one wording of an unknown ``upstream_model``, for every provider."""
    names = ", ".join(sorted(known)) or "none"
    return (
        f"upstream_model: {upstream_model!r} is not a model the {provider} provider knows "
        f"(known: {names})"
    )
