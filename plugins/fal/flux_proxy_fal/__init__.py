"""fal.ai as a flux-proxy provider: FLUX 1.1 [pro] (and ultra) through fal's queue or sync API."""

from flux_proxy_fal.provider import FalProvider

__all__ = ["FalProvider"]
