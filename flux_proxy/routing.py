"""Public model names (and aliases) to the provider model that serves them."""

from __future__ import annotations

from dataclasses import dataclass

from flux_proxy.capabilities import Capabilities
from flux_proxy.config import ConfigError, ModelConfig, Settings
from flux_proxy.errors import ModelNotFound
from flux_proxy.providers.base import Provider


@dataclass(frozen=True, slots=True)
class ModelRoute:
    name: str  # the configured public name (aliases resolve to it)
    config: ModelConfig
    provider: Provider
    capabilities: Capabilities

    @property
    def upstream_model(self) -> str:
        return self.config.upstream_model or self.name


class Router:
    def __init__(self, settings: Settings, providers: dict[str, Provider]) -> None:
        self._routes: dict[str, ModelRoute] = {}
        self._by_name: dict[str, ModelRoute] = {}
        for name, model in settings.models.items():
            provider = providers.get(model.provider)
            if provider is None:
                known = ", ".join(sorted(providers)) or "none"
                raise ConfigError(
                    f"models.{name}.provider: unknown provider {model.provider!r} "
                    f"(installed: {known})"
                )
            try:
                capabilities = provider.capabilities(model).with_overrides(model.capabilities)
            except ValueError as exc:
                raise ConfigError(f"models.{name}.capabilities: {exc}") from None
            route = ModelRoute(name, model, provider, capabilities)
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

    def public_names(self) -> list[tuple[str, ModelRoute]]:
        return list(self._by_name.items())

    def default_model(self) -> str | None:
        """The model used when the request names none: the only one configured."""
        return next(iter(self._routes)) if len(self._routes) == 1 else None
