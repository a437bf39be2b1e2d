"""The gateway's one HTTP client runs on aiohttp's pool (flux_proxy/transport.py): over
real loopback servers it keeps httpx's guarantees: no cookie replayed, failures mapped."""

from __future__ import annotations

import base64
import gc
import gzip
import json
import time
import weakref
from collections.abc import Callable
from typing import Any

import aiohttp
import httpx
import pytest
from starlette.types import Receive, Scope, Send

from flux_proxy.transport import AiohttpTransport, _headers, _HttpxErrors
from tests.images import assert_image, make_image
from tests.openapi import assert_openai_error
from tests.servers import ServeUpstream
from tests.upstream_openai import RecordingUpstream, gateway_config


class CookieSettingUpstream:
    """Answers an image and sets a cookie every time; records the requests' cookies."""

    def __init__(self) -> None:
        self.cookies: list[str | None] = []
        text = base64.b64encode(make_image("png", (8, 8))).decode()
        self._body = json.dumps({"created": 1, "data": [{"b64_json": text}]}).encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = dict(scope["headers"])
        self.cookies.append(headers.get(b"cookie", b"").decode() or None)
        while (await receive()).get("more_body"):
            pass
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(self._body)).encode()),
                    (b"set-cookie", b"session=abc; Path=/"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": self._body})


async def cut_short(scope: Scope, receive: Receive, send: Send) -> None:
    """Promises a long answer and stops after a few bytes, as a dying upstream does."""
    while (await receive()).get("more_body"):
        pass
    headers = [(b"content-type", b"application/json"), (b"content-length", b"100000")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": b'{"data": [', "more_body": True})


class GzipUpstream:
    """Answers an 8x8 PNG's JSON gzip-compressed, with the compressed Content-Length,
    padded with ``padding`` spaces (which compress to almost nothing)."""

    def __init__(self, padding: int = 0) -> None:
        text = base64.b64encode(make_image("png", (8, 8))).decode()
        body = json.dumps({"created": 1, "data": [{"b64_json": text}]}) + " " * padding
        self.body = gzip.compress(body.encode())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        while (await receive()).get("more_body"):
            pass
        headers = [
            (b"content-type", b"application/json"),
            (b"content-encoding", b"gzip"),
            (b"content-length", str(len(self.body)).encode()),
        ]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": self.body})


def post(gateway: str, **body: Any) -> httpx.Response:
    payload = {"model": "up", "prompt": "x", "size": "8x8", "response_format": "b64_json"}
    return httpx.post(f"{gateway}/v1/images/generations", json={**payload, **body}, timeout=30)


def test_an_upstreams_cookies_are_never_sent_back(serve_upstream, start_gateway):
    upstream = CookieSettingUpstream()
    gateway = start_gateway(gateway_config(serve_upstream(upstream), "b64_json"))
    for _ in range(2):
        response = post(gateway)
        assert response.status_code == 200, response.text
        assert_image(base64.b64decode(response.json()["data"][0]["b64_json"]), "png", (8, 8))
        assert "set-cookie" not in response.headers
    assert upstream.cookies == [None, None]


class PortRecorder:
    """The OpenAI emulator, noting the client port each request came from."""

    def __init__(self) -> None:
        self.ports: list[int] = []
        self._app = RecordingUpstream().app()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            self.ports.append(scope["client"][1])
        await self._app(scope, receive, send)


@pytest.mark.parametrize(("idle_seconds", "reused"), [(0.3, False), (30.0, True)])
def test_a_connection_idle_past_upstream_idle_seconds_is_not_reused(
    serve_upstream: ServeUpstream,
    start_gateway: Callable[..., str],
    idle_seconds: float,
    reused: bool,
) -> None:
    """A pooled connection idle longer than the setting is never sent a request: the
    upstream may be closing it that instant (uvicorn's 5 s keep-alive), and a POST
    that meets the close fails and may not be retried."""
    upstream = PortRecorder()
    config = gateway_config(serve_upstream(upstream), "b64_json")
    config["limits"] = {"upstream_idle_seconds": idle_seconds}
    gateway = start_gateway(config)
    for pause in (0.0, 0.0, 0.6):
        time.sleep(pause)
        response = post(gateway)
        assert response.status_code == 200, response.text
        assert_image(base64.b64decode(response.json()["data"][0]["b64_json"]), "png", (8, 8))
    first, at_once, after_pause = upstream.ports
    assert at_once == first  # kept alive and reused within the setting
    assert (after_pause == first) is reused, upstream.ports


def test_an_answer_cut_short_is_a_502(serve_upstream, start_gateway):
    gateway = start_gateway(gateway_config(serve_upstream(cut_short), "b64_json"))
    error = assert_openai_error(post(gateway), 502)
    assert "could not be reached" in error["message"], error


def test_a_compressed_answer_is_decoded(serve_upstream, start_gateway):
    gateway = start_gateway(gateway_config(serve_upstream(GzipUpstream()), "b64_json"))
    response = post(gateway)
    assert response.status_code == 200, response.text
    assert_image(base64.b64decode(response.json()["data"][0]["b64_json"]), "png", (8, 8))


def test_a_compressed_answer_is_capped_by_what_it_decodes_to(serve_upstream, start_gateway):
    # The answer cap with max_fetch_bytes 1024 is about 66 KB: the answer is a few
    # hundred bytes on the wire, under it, and 1 MB decoded, far over it.
    upstream = GzipUpstream(padding=2**20)
    assert len(upstream.body) < 16384
    config = gateway_config(serve_upstream(upstream), "b64_json")
    config["limits"] = {"max_fetch_bytes": 1024}
    error = assert_openai_error(post(gateway=start_gateway(config)), 502)
    assert "larger than the gateway accepts" in error["message"], error


def test_request_headers_reach_aiohttp_as_httpx_decodes_them():
    cases: list[list[tuple[bytes, bytes]]] = [
        [(b"Host", b"up.test"), (b"Authorization", b"Bearer k"), (b"Transfer-Encoding", b"x")],
        [(b"X-Name", "café".encode()), (b"Accept", b"*/*")],  # UTF-8, as a client may send
        [(b"X-Name", b"caf\xe9")],  # neither ASCII nor UTF-8
    ]
    transport = AiohttpTransport(max_connections=1, ssl_context=httpx.create_ssl_context)
    for raw in cases:
        headers = httpx.Headers(raw)
        expected = [(k, v) for k, v in headers.multi_items() if k != "transfer-encoding"]
        assert _headers(headers) == expected
        for _ in range(2):  # each pair converted, then as it was kept
            assert transport._headers(headers) == expected


def test_a_mapped_failure_keeps_no_frame_of_the_exchange_alive() -> None:
    class Held:
        """Stands for what a failed exchange's frames hold (an answer's bytes)."""

    def exchange(alive: list[weakref.ref[Held]]) -> None:
        held = Held()
        alive.append(weakref.ref(held))
        with _HttpxErrors(httpx.Request("POST", "http://upstream.test/v1")):
            raise aiohttp.ClientPayloadError("cut short")

    alive: list[weakref.ref[Held]] = []
    gc.disable()  # only reference counts free it: no cycle may hold the frame
    try:
        with pytest.raises(httpx.ReadError):
            exchange(alive)
        assert alive[0]() is None
    finally:
        gc.enable()
