"""The hooks flux-proxy finds through the ``flux_proxy`` entry point."""

from __future__ import annotations

from flux_proxy import sdk
from flux_proxy_bfl.emulator import create_app
from flux_proxy_bfl.provider import BflProvider


@sdk.hookimpl
def register_providers(register: sdk.RegisterProvider) -> None:
    register("bfl", BflProvider)


@sdk.hookimpl
def register_emulators(register: sdk.RegisterEmulator) -> None:
    register("bfl", create_app)
