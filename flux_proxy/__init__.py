"""flux-proxy: an OpenAI-compatible image-generation gateway as an ASGI middleware stack."""

from flux_proxy.app import FluxProxy, FluxProxyMiddleware
from flux_proxy.config import Settings, load_settings

__all__ = ["FluxProxy", "FluxProxyMiddleware", "Settings", "load_settings"]
__version__ = "0.1.0"
