"""Entry point: registers the fal provider and its emulator with flux-proxy."""

from __future__ import annotations

from flux_proxy.hookspecs import RegisterEmulator, RegisterProvider, hookimpl
from flux_proxy_fal.emulator import create_app
from flux_proxy_fal.provider import FalProvider


@hookimpl
def register_providers(register: RegisterProvider) -> None:
    register("fal", FalProvider)


@hookimpl
def register_emulators(register: RegisterEmulator) -> None:
    register("fal", create_app)
