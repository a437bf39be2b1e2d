"""Calling a gateway in process, through httpx.ASGITransport (no socket, no server)."""

from __future__ import annotations

from typing import Any

import httpx

from flux_proxy import FluxProxy

# The local renderer under tiny limits (64 pixels a side, two images): for tests that
# send many generated bodies, so the ones accepted render in milliseconds.
TINY_SIDE = 64
TINY_N = 2
TINY_LOCAL: dict[str, Any] = {
    "limits": {"max_pixels": TINY_SIDE * TINY_SIDE, "max_side": TINY_SIDE, "max_n": TINY_N},
    "models": {
        "flux1.1-pro": {
            "provider": "local",
            "aliases": ["flux-pro-1.1"],
            "capabilities": {"default_size": "32x32"},
        }
    },
}


async def generate(app: FluxProxy, **body: Any) -> httpx.Response:
    """``POST /v1/images/generations`` with ``body`` to ``app``."""
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://gateway"
    ) as client:
        return await client.post("/v1/images/generations", json=body, timeout=20)
