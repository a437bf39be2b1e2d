"""flux-proxy: an OpenAI-compatible image-generation gateway as an ASGI middleware stack."""

from importlib.metadata import version

from flux_proxy.app import FluxProxy, FluxProxyMiddleware
from flux_proxy.config import Settings, load_settings

__all__ = ["FluxProxy", "FluxProxyMiddleware", "Settings", "load_settings"]
# The installed distribution's version: pyproject.toml is the one place it is written.
__version__ = version("flux-proxy")
