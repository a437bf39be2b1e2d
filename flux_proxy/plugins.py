"""Finding plugins: the built-in ones, then every installed ``flux_proxy`` entry point."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import pluggy

import flux_proxy.hookspecs as hookspecs
from flux_proxy.hookspecs import EmulatorFactory
from flux_proxy.pipeline import LayerClass
from flux_proxy.providers.base import ProviderFactory

ENTRY_POINT_GROUP = "flux_proxy"

BUILTIN_PLUGINS = (
    "flux_proxy.middlewares",
    "flux_proxy.providers.local",
    "flux_proxy.providers.openai_compat",
)


@dataclass
class Registry:
    providers: dict[str, ProviderFactory] = field(default_factory=dict)
    middlewares: dict[str, LayerClass] = field(default_factory=dict)
    emulators: dict[str, EmulatorFactory] = field(default_factory=dict)


def load_registry(extra_plugins: Iterable[object] = (), *, entry_points: bool = True) -> Registry:
    """Collect providers and middlewares from built-ins, entry points and ``extra_plugins``."""
    manager = pluggy.PluginManager("flux_proxy")
    manager.add_hookspecs(hookspecs)
    for module_name in BUILTIN_PLUGINS:
        manager.register(__import__(module_name, fromlist=["_"]), name=module_name)
    if entry_points:
        manager.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
    for plugin in extra_plugins:
        manager.register(plugin)

    registry = Registry()
    manager.hook.register_providers(register=registry.providers.__setitem__)
    manager.hook.register_middlewares(register=registry.middlewares.__setitem__)
    manager.hook.register_emulators(register=registry.emulators.__setitem__)
    return registry
