"""The plugin's hooks: what ``flux_proxy``'s entry point finds when the package is installed."""

from __future__ import annotations

from flux_proxy.hookspecs import RegisterEmulator, RegisterProvider, hookimpl
from flux_proxy_replicate.emulator import create_app
from flux_proxy_replicate.provider import ReplicateProvider


@hookimpl
def register_providers(register: RegisterProvider) -> None:
    register(ReplicateProvider.name, ReplicateProvider)


@hookimpl
def register_emulators(register: RegisterEmulator) -> None:
    register(ReplicateProvider.name, create_app)
