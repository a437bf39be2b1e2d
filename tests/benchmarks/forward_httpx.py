"""A thin Python proxy on httpx: Starlette plus one shared ``httpx.AsyncClient``,
streaming the request and the answer through unchanged (the aiohttp forwarder's twin).

``uvicorn --factory tests.benchmarks.forward_httpx:create_app`` with
``BENCH_UPSTREAM=http://host:port`` in the environment.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.routing import Route

# Per-connection headers are the proxy's own business, not the message's.
HOP_BY_HOP = frozenset({"connection", "keep-alive", "transfer-encoding", "host"})


def create_app() -> Starlette:
    upstream = os.environ["BENCH_UPSTREAM"]

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
        async with httpx.AsyncClient(limits=limits, timeout=60.0) as client:
            app.state.client = client
            yield

    async def forward(request: Request) -> StreamingResponse:
        client: httpx.AsyncClient = request.app.state.client
        headers = {k: v for k, v in request.headers.items() if k not in HOP_BY_HOP}
        outgoing = client.build_request(
            request.method, upstream + request.url.path, headers=headers, content=request.stream()
        )
        answer = await client.send(outgoing, stream=True)
        return StreamingResponse(
            answer.aiter_raw(),
            status_code=answer.status_code,
            headers={k: v for k, v in answer.headers.items() if k.lower() not in HOP_BY_HOP},
            background=BackgroundTask(answer.aclose),
        )

    methods = ["GET", "POST"]
    return Starlette(routes=[Route("/{path:path}", forward, methods=methods)], lifespan=lifespan)
