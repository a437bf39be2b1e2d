"""``limits.upstream_timeout`` bounds a whole upstream exchange, not each read: an
upstream that trickles its answer a byte at a time, each byte well inside the read
timeout, is given up at the budget, over a real loopback connection."""

from __future__ import annotations

import base64
import json

import anyio
import httpx
from starlette.types import Receive, Scope, Send

from tests.images import make_image
from tests.openapi import assert_openai_error
from tests.upstream_openai import gateway_config

# Each byte comes this long after the last: far inside any read timeout a test sets.
BYTE_GAP = 0.02


class TricklingUpstream:
    """An OpenAI images answer (a real 8x8 PNG), sent one byte at a time; it would
    take about len(body) * BYTE_GAP seconds (several) to finish."""

    def __init__(self) -> None:
        image = base64.b64encode(make_image("png", (8, 8))).decode()
        self.body = json.dumps({"created": 1, "data": [{"b64_json": image}]}).encode()
        self.bytes_sent = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        while (await receive()).get("more_body"):
            pass
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(self.body)).encode()),
        ]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        for index in range(len(self.body)):
            await send(
                {
                    "type": "http.response.body",
                    "body": self.body[index : index + 1],
                    "more_body": True,
                }
            )
            self.bytes_sent += 1
            await anyio.sleep(BYTE_GAP)
        await send({"type": "http.response.body", "body": b""})


def post(gateway: str) -> httpx.Response:
    payload = {"model": "up", "prompt": "x", "size": "8x8", "response_format": "b64_json"}
    return httpx.post(f"{gateway}/v1/images/generations", json=payload, timeout=60)


def test_a_trickling_upstream_is_given_up_at_upstream_timeout(serve_upstream, start_gateway):
    upstream = TricklingUpstream()
    config = gateway_config(serve_upstream(upstream), "b64_json")
    # The request's own deadline is far away: only a whole-exchange budget stops this.
    config["limits"] = {"upstream_timeout": 0.3, "request_timeout": 60}
    error = assert_openai_error(post(start_gateway(config)), 504)
    assert error["code"] == "upstream_timeout", error
    # Given up part-way: the answer had not been sent whole.
    assert upstream.bytes_sent < len(upstream.body)
