"""flux-proxy: an OpenAI-compatible image-generation gateway as an ASGI middleware stack."""

from __future__ import annotations

import importlib
from importlib.metadata import version
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from flux_proxy.app import FluxProxy, FluxProxyMiddleware
    from flux_proxy.config import Settings, load_settings

__all__ = ["FluxProxy", "FluxProxyMiddleware", "Settings", "load_settings"]
# The installed distribution's version: pyproject.toml is the one place it is written.
__version__ = version("flux-proxy")

# Imported on first use: the CLI imports flux_proxy.config to report a bad config file or
# option, and importing the whole gateway for that (httpx, Pillow, Starlette, every
# layer and plugin machinery) would more than double what `flux-proxy --help` costs.
_EXPORTS = {
    "FluxProxy": "flux_proxy.app",
    "FluxProxyMiddleware": "flux_proxy.app",
    "Settings": "flux_proxy.config",
    "load_settings": "flux_proxy.config",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
