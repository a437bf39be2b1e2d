"""The plugin's hooks: what ``flux_proxy``'s entry point finds when the package is installed."""

from __future__ import annotations

from flux_proxy import sdk
from flux_proxy_replicate.emulator import create_app
from flux_proxy_replicate.provider import ReplicateProvider


@sdk.hookimpl
def register_providers(register: sdk.RegisterProvider) -> None:
    register(ReplicateProvider.name, ReplicateProvider)


@sdk.hookimpl
def register_emulators(register: sdk.RegisterEmulator) -> None:
    register(ReplicateProvider.name, create_app)
