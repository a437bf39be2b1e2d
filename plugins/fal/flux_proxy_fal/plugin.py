"""Entry point: registers the fal provider and its emulator with flux-proxy."""

from __future__ import annotations

from flux_proxy import sdk
from flux_proxy_fal.emulator import create_app
from flux_proxy_fal.provider import FalProvider


@sdk.hookimpl
def register_providers(register: sdk.RegisterProvider) -> None:
    register("fal", FalProvider)


@sdk.hookimpl
def register_emulators(register: sdk.RegisterEmulator) -> None:
    register("fal", create_app)
