"""The plugin hooks. Built-in providers and middlewares use them like any plugin.

A plugin is a module (or object) with functions marked ``@hookimpl``; an
installed package exposes it through the ``flux_proxy`` entry-point group::

    [project.entry-points.flux_proxy]
    bfl = "flux_proxy_bfl.plugin"
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from starlette.types import ASGIApp

    from flux_proxy.pipeline import LayerClass
    from flux_proxy.providers.base import ProviderFactory

hookspec = pluggy.HookspecMarker("flux_proxy")
hookimpl = pluggy.HookimplMarker("flux_proxy")

RegisterProvider = Callable[[str, "ProviderFactory"], None]
RegisterMiddleware = Callable[[str, "LayerClass"], None]
EmulatorFactory = Callable[[], "ASGIApp"]
RegisterEmulator = Callable[[str, EmulatorFactory], None]


@hookspec
def register_providers(register: RegisterProvider) -> None:
    """Call ``register(name, factory)`` for each provider the plugin offers.

    ``factory(runtime)`` returns an object following ``providers.base.Provider``.
    """


@hookspec
def register_middlewares(register: RegisterMiddleware) -> None:
    """Call ``register(name, cls)`` for each image layer the plugin offers.

    ``cls`` subclasses ``pipeline.Layer``: it declares its options model, its
    effects and the parameters it honours, and is built as ``cls(runtime, options)``
    when settings' ``middlewares`` list names it (which run, in which order).
    """


@hookspec
def register_emulators(register: RegisterEmulator) -> None:
    """Call ``register(name, factory)`` for each provider emulator the plugin ships.

    ``factory()`` returns an ASGI app speaking the provider's protocol, for offline
    tests and for trying the gateway with no keys (``flux-proxy emulate NAME``).
    """
