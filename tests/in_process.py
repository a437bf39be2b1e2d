"""Calling a gateway in process, through httpx.ASGITransport (no socket, no server)."""

from __future__ import annotations

from typing import Any

import httpx

from flux_proxy import FluxProxy


async def generate(app: FluxProxy, **body: Any) -> httpx.Response:
    """``POST /v1/images/generations`` with ``body`` to ``app``."""
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://gateway"
    ) as client:
        return await client.post("/v1/images/generations", json=body, timeout=20)
