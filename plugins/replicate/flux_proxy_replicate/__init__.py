"""flux-proxy provider plugin for Replicate's predictions API (FLUX 1.1 [pro] models)."""

from flux_proxy_replicate.provider import MODELS, ReplicateProvider

__all__ = ["MODELS", "ReplicateProvider"]
