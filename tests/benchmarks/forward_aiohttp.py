"""The floor for a Python proxy: Starlette plus one shared ``aiohttp.ClientSession``,
streaming the request and the answer through unchanged.

``uvicorn --factory tests.benchmarks.forward_aiohttp:create_app`` with
``BENCH_UPSTREAM=http://host:port`` in the environment.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import aiohttp
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
        connector = aiohttp.TCPConnector(limit=0)  # no pool cap: the client sets concurrency
        async with aiohttp.ClientSession(connector=connector, auto_decompress=False) as session:
            app.state.session = session
            yield

    async def forward(request: Request) -> StreamingResponse:
        session: aiohttp.ClientSession = request.app.state.session
        headers = {k: v for k, v in request.headers.items() if k not in HOP_BY_HOP}
        answer = await session.request(
            request.method, upstream + request.url.path, headers=headers, data=request.stream()
        )
        return StreamingResponse(
            answer.content.iter_any(),
            status_code=answer.status,
            headers={k: v for k, v in answer.headers.items() if k.lower() not in HOP_BY_HOP},
            background=BackgroundTask(answer.release),
        )

    methods = ["GET", "POST"]
    return Starlette(routes=[Route("/{path:path}", forward, methods=methods)], lifespan=lifespan)
