"""flux-proxy plugin for Black Forest Labs' own API (FLUX 1.1 [pro] and FLUX 1.1 [pro] Ultra)."""

from flux_proxy_bfl.provider import BflProvider

__all__ = ["BflProvider"]
