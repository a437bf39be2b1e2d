"""Upstream faults on a real socket (tests/faulty_upstream.py) map to the README's statuses.

The gateway runs in process; its upstream calls go over loopback to a server that
answers 500, 429, resets the connection (TCP RST) or is slow, as each test asks.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from typing import Any

import pytest

from flux_proxy import FluxProxy
from tests.asgi import asgi_client
from tests.faulty_upstream import FaultPlan, FaultyUpstream, serve_in_thread
from tests.images import assert_image
from tests.openapi import assert_openai_error

pytestmark = pytest.mark.anyio


@pytest.fixture
def upstream(request: pytest.FixtureRequest) -> Iterator[tuple[FaultyUpstream, str]]:
    kind, slow = request.param
    faulty = FaultyUpstream(FaultPlan(rate=1.0, kinds=(kind,), slow_seconds=slow, side=32))
    with serve_in_thread(faulty) as url:
        yield faulty, url


def config(url: str, **limits: Any) -> dict[str, Any]:
    entry = {"provider": "openai", "base_url": f"{url}/v1", "options": {"response_format": None}}
    return {
        "limits": limits,
        "breaker": {"failure_threshold": 2},
        "models": {"m": entry},
    }


BODY = {"model": "m", "prompt": "x", "size": "32x32", "response_format": "b64_json"}


@pytest.mark.parametrize(
    ("upstream", "status", "code"),
    [
        (("500", 0), 502, "upstream_error"),
        (("429", 0), 429, "rate_limit_exceeded"),
        (("reset", 0), 502, "upstream_error"),
        (("cut", 0), 502, "upstream_error"),
        (("slow", 2.0), 504, "upstream_timeout"),
    ],
    indirect=["upstream"],
)
async def test_each_fault_gets_its_status_then_the_circuit_opens(upstream, status, code):
    faulty, url = upstream
    app = FluxProxy(config(url, upstream_timeout=0.2), environ={})
    async with asgi_client(app) as client:
        for _ in range(2):
            response = await client.post("/v1/images/generations", json=BODY)
            assert assert_openai_error(response, status)["code"] == code
        if status == 429:
            assert response.headers["retry-after"] == "1"
        refused = await client.post("/v1/images/generations", json=BODY)
    assert assert_openai_error(refused, 503)["code"] == "upstream_unavailable"
    assert faulty.served.total() == 2  # the third was never sent


@pytest.mark.parametrize("upstream", [("slow", 0.3)], indirect=True)
async def test_slow_within_the_upstream_timeout_is_no_fault(upstream):
    faulty, url = upstream
    app = FluxProxy(config(url, upstream_timeout=30), environ={})
    async with asgi_client(app) as client:
        response = await client.post("/v1/images/generations", json=BODY)
    assert response.status_code == 200, response.text
    assert_image(base64.b64decode(response.json()["data"][0]["b64_json"]), "png", (32, 32))
    assert faulty.served == {"slow": 1}
