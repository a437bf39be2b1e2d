from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack
from typing import Any

import openai
import pytest

from flux_proxy import FluxProxy
from tests.servers import ServerPool, ServeUpstream, serve
from tests.trust_store import lazy_ca_store


@pytest.fixture(scope="session", autouse=True)
def cheap_tls_contexts() -> Iterator[None]:
    """Creating an HTTP client costs ~1 ms instead of ~35 (see tests/trust_store.py)."""
    with lazy_ca_store():
        yield


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def server_pool() -> Iterator[ServerPool]:
    pool = ServerPool()
    try:
        yield pool
    finally:
        pool.close()


@pytest.fixture
def serve_upstream(server_pool: ServerPool) -> Iterator[ServeUpstream]:
    """Serve an upstream app (an emulator, a recorder) for this test; returns its base URL.

    The loopback server is kept for the session; the app is the test's own, so pass a
    fresh one: nothing of one test's upstream state can reach the next.
    """
    with ExitStack() as stack:
        yield lambda app: stack.enter_context(server_pool.serve(app))


@pytest.fixture
def start_gateway() -> Iterator[Callable[..., str]]:
    """Start a real gateway (uvicorn, loopback) from a settings mapping; returns its base URL."""
    with ExitStack() as stack:

        def start(config: dict[str, Any] | None = None, **options: Any) -> str:
            options.setdefault("environ", {})
            app = FluxProxy(config or {}, **options)
            return stack.enter_context(serve(app))

        yield start


@pytest.fixture
def gateway(start_gateway: Callable[..., str]) -> str:
    """The embedded default: flux1.1-pro on the local renderer."""
    return start_gateway()


@pytest.fixture
def client(gateway: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway}/v1", api_key="unused", max_retries=0)
