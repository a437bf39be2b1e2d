"""Public model names (and aliases) to the providers that serve them."""

from __future__ import annotations

from dataclasses import dataclass

from flux_proxy.config import ConfigError, ModelConfig, ProviderConfig, Settings
from flux_proxy.errors import ModelNotFound
from flux_proxy.providers.base import Provider
from flux_proxy.schema import Target


@dataclass(frozen=True, slots=True)
class ModelRoute:
    name: str
    config: ModelConfig
    targets: list[Target]  # in failover order; plain data, as jobs carry them
    description: str

    @property
    def owned_by(self) -> str:
        return "flux-proxy:" + ",".join(target.provider.name for target in self.targets)


class Router:
    def __init__(self, settings: Settings, providers: dict[str, Provider]) -> None:
        self._routes: dict[str, ModelRoute] = {}
        self._by_name: dict[str, ModelRoute] = {}
        for name, model in settings.models.items():
            targets = [
                _target(name, index, config, providers)
                for index, config in enumerate(model.providers)
            ]
            first = providers[model.providers[0].provider]
            description = model.description or first.description(model.providers[0])
            route = ModelRoute(name, model, targets, description)
            self._routes[name] = route
            for public in (name, *model.aliases):
                if public in self._by_name:
                    raise ConfigError(f"models.{name}: name {public!r} is used twice")
                self._by_name[public] = route

    def resolve(self, name: str) -> ModelRoute:
        route = self._by_name.get(name)
        if route is None:
            raise ModelNotFound(
                f"The model {name!r} does not exist on this gateway.", param="model"
            )
        return route

    def models(self) -> list[ModelRoute]:
        """The configured models, once each (no aliases), in config order."""
        return list(self._routes.values())

    def public_names(self) -> list[tuple[str, ModelRoute]]:
        return list(self._by_name.items())

    def default_model(self) -> str | None:
        """The model used when the request names none: the only one configured."""
        return next(iter(self._routes)) if len(self._routes) == 1 else None


def _target(
    name: str, index: int, config: ProviderConfig, providers: dict[str, Provider]
) -> Target:
    where = f"models.{name}" if index == 0 else f"models.{name}.providers.{index}"
    provider = providers.get(config.provider)
    if provider is None:
        known = ", ".join(sorted(providers)) or "none"
        raise ConfigError(
            f"{where}.provider: unknown provider {config.provider!r} (installed: {known})"
        )
    try:
        declared = provider.capabilities(config)
    except (ConfigError, ValueError) as exc:  # the provider refuses the entry (options, model)
        raise ConfigError(f"{where}: {_first_line(exc)}") from None
    try:
        capabilities = declared.with_overrides(config.capabilities)
    except ValueError as exc:
        raise ConfigError(f"{where}.capabilities: {_first_line(exc)}") from None
    # A provider may name its usual model (``default_model``); else the public name.
    upstream_model = config.upstream_model or getattr(provider, "default_model", None) or name
    return Target(name, upstream_model, config, capabilities, provider)


def _first_line(exc: Exception) -> str:
    """pydantic's message without its help links: 'sizes.bogus: Extra inputs ...'."""
    errors = getattr(exc, "errors", None)
    if callable(errors):
        first = errors()[0]
        loc = ".".join(str(part) for part in first["loc"])
        return f"{loc}: {first['msg']}" if loc else str(first["msg"])
    return str(exc).splitlines()[0]
