"""The hooks flux-proxy finds through the ``flux_proxy`` entry point."""

from __future__ import annotations

from flux_proxy.hookspecs import RegisterEmulator, RegisterProvider, hookimpl
from flux_proxy_bfl.emulator import create_app
from flux_proxy_bfl.provider import BflProvider


@hookimpl
def register_providers(register: RegisterProvider) -> None:
    register("bfl", BflProvider)


@hookimpl
def register_emulators(register: RegisterEmulator) -> None:
    register("bfl", create_app)
