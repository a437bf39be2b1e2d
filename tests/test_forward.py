"""Standalone mode forwards every non-image request, unchanged, to forward.base_url.

Real servers on loopback: a recording upstream (Starlette under uvicorn) and the
gateway in front of it, talked to with plain httpx as any OpenAI client would.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import logging
import socket
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from flux_proxy.config import ConfigError, load_settings
from tests.openapi import assert_openai_error
from tests.servers import ServeUpstream, serve

UPSTREAM_KEY = "sk-upstream-secret-0123456789"
BIG_CHUNKS = 128  # of 64 KiB: 8 MiB


def big_chunk(index: int) -> bytes:
    return hashlib.sha256(index.to_bytes(4, "big")).digest() * 2048


def big_digest() -> str:
    digest = hashlib.sha256()
    for index in range(BIG_CHUNKS):
        digest.update(big_chunk(index))
    return digest.hexdigest()


@dataclass
class Seen:
    method: str
    path: str
    query: str
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> list[str]:
        return [value for key, value in self.headers if key == name]


@dataclass
class Upstream:
    url: str
    seen: list[Seen] = field(default_factory=list)
    release: threading.Event = field(default_factory=threading.Event)
    endless_closed: threading.Event = field(default_factory=threading.Event)

    @property
    def netloc(self) -> str:
        return self.url.removeprefix("http://")


def upstream_app(upstream: Upstream) -> Starlette:
    async def wait_for_release() -> None:
        # The test sets the event from its own thread; the fixture sets it at teardown.
        await asyncio.to_thread(upstream.release.wait)

    async def anything(request: Request) -> Response:
        upstream.seen.append(
            Seen(
                method=request.method,
                path=request.scope["raw_path"].decode("latin-1"),
                query=request.scope["query_string"].decode("latin-1"),
                headers=[(k.decode(), v.decode("latin-1")) for k, v in request.headers.raw],
                body=await request.body(),
            )
        )
        path = request.url.path
        if path == "/v1/chat/completions":
            return Response(
                b'{"id": "chatcmpl-1", "object": "chat.completion"}',
                status_code=201,
                media_type="application/json",
                headers={
                    "x-upstream": "yes",
                    "connection": "x-response-hop",
                    "x-response-hop": "1",
                    "keep-alive": "timeout=5",
                    "proxy-authenticate": "Basic",
                },
            )
        if path == "/v1/missing":
            response = JSONResponse(
                {"error": {"message": "nope", "type": "invalid_request_error"}}, status_code=404
            )
            response.set_cookie("a", "1")
            response.set_cookie("b", "2")
            return response
        if path == "/big":

            async def big() -> AsyncIterator[bytes]:
                for index in range(BIG_CHUNKS):
                    yield big_chunk(index)

            return StreamingResponse(big(), media_type="application/octet-stream")
        if path == "/gated":

            async def gated() -> AsyncIterator[bytes]:
                yield b"first\n"
                await wait_for_release()
                yield b"last\n"

            return StreamingResponse(gated(), media_type="text/event-stream")
        if path == "/endless":

            async def endless() -> AsyncIterator[bytes]:
                try:
                    while True:
                        yield b"data: tick\n\n"
                        await asyncio.sleep(0.02)
                finally:
                    upstream.endless_closed.set()

            return StreamingResponse(endless(), media_type="text/event-stream")
        if path == "/broken":

            async def broken() -> AsyncIterator[bytes]:
                yield b"partial"
                raise RuntimeError("upstream died mid-stream")

            return StreamingResponse(broken(), media_type="text/plain")
        if path == "/slow":
            await wait_for_release()
            return PlainTextResponse("late")
        if path == "/redirect":
            return Response(status_code=302, headers={"location": "/elsewhere"})
        if path == "/gzip":
            return Response(
                gzip.compress(b"hello " * 1000),
                media_type="text/plain",
                headers={"content-encoding": "gzip"},
            )
        return JSONResponse({"ok": True, "size": len(upstream.seen[-1].body)})

    methods = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
    return Starlette(routes=[Route("/{path:path}", anything, methods=methods)])


@pytest.fixture
def upstream(serve_upstream: ServeUpstream) -> Iterator[Upstream]:
    recorder = Upstream(url="")
    recorder.url = serve_upstream(upstream_app(recorder))
    try:
        yield recorder
    finally:
        recorder.release.set()  # let any parked handler finish before the app is unplugged


@pytest.fixture
def forwarding(start_gateway: Callable[..., str], upstream: Upstream) -> Callable[..., str]:
    """Start a gateway forwarding to ``upstream``; extra settings merge into ``forward``."""

    def start(environ: dict[str, str] | None = None, **forward: Any) -> str:
        return start_gateway(
            {"forward": {"base_url": upstream.url, **forward}}, environ=environ or {}
        )

    return start


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def test_post_arrives_unchanged_and_the_answer_comes_back(forwarding, upstream):
    gateway = forwarding()
    body = b'{"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}'
    response = httpx.post(
        f"{gateway}/v1/chat/completions?a=1&b=x%20y&c=%2F&d=",
        content=body,
        headers={
            "content-type": "application/json",
            "x-custom": "kept",
            "authorization": "Bearer c",
        },
    )
    assert response.status_code == 201
    assert response.content == b'{"id": "chatcmpl-1", "object": "chat.completion"}'
    assert response.headers["content-type"] == "application/json"
    assert response.headers["x-upstream"] == "yes"

    [seen] = upstream.seen
    assert seen.method == "POST"
    assert seen.path == "/v1/chat/completions"
    assert seen.query == "a=1&b=x%20y&c=%2F&d="
    assert seen.body == body
    assert seen.header("content-type") == ["application/json"]
    assert seen.header("content-length") == [str(len(body))]
    assert seen.header("x-custom") == ["kept"]
    assert seen.header("authorization") == ["Bearer c"]  # no upstream key configured
    assert seen.header("host") == [upstream.netloc]


def test_raw_path_and_query_are_not_reencoded(forwarding, upstream):
    gateway = forwarding()
    response = httpx.get(f"{gateway}/v1/files/a%2Fb%20c:d?x=%2F&y=1+2&z")
    assert response.status_code == 200
    [seen] = upstream.seen
    assert (seen.method, seen.path, seen.query) == ("GET", "/v1/files/a%2Fb%20c:d", "x=%2F&y=1+2&z")
    assert seen.header("transfer-encoding") == []  # a GET without a body gets none
    assert seen.header("content-length") == []


def test_base_url_path_is_kept_in_front_of_the_client_path(start_gateway, upstream):
    gateway = start_gateway({"forward": {"base_url": f"{upstream.url}/openai/"}})
    assert httpx.delete(f"{gateway}/v1/files/f1").status_code == 200
    assert [(s.method, s.path) for s in upstream.seen] == [("DELETE", "/openai/v1/files/f1")]


def test_hop_by_hop_headers_are_dropped_both_ways(forwarding, upstream):
    gateway = forwarding()
    response = httpx.post(
        f"{gateway}/v1/chat/completions",
        content=b"{}",
        headers={
            "connection": "keep-alive, x-request-hop",
            "x-request-hop": "1",
            "keep-alive": "timeout=5",
            "proxy-authorization": "Basic cHJveHk6cHJveHk=",
            "te": "trailers",
            "trailer": "x-checksum",
            "upgrade": "h2c",
            "x-end-to-end": "kept",
        },
    )
    assert response.status_code == 201
    [seen] = upstream.seen
    names = {name for name, _ in seen.headers}
    for hop in (
        "connection",
        "x-request-hop",
        "keep-alive",
        "proxy-authorization",
        "te",
        "trailer",
        "upgrade",
    ):
        assert hop not in names, hop
    assert seen.header("x-end-to-end") == ["kept"]
    assert seen.header("host") == [upstream.netloc]

    for hop in ("x-response-hop", "keep-alive", "proxy-authenticate"):
        assert hop not in response.headers, hop
    assert response.headers.get("connection", "keep-alive") == "keep-alive"  # the gateway's own


def test_upstream_error_status_body_and_repeated_headers_pass_through(forwarding, upstream):
    gateway = forwarding()
    response = httpx.get(f"{gateway}/v1/missing")
    assert response.status_code == 404
    assert response.json() == {"error": {"message": "nope", "type": "invalid_request_error"}}
    assert len(response.headers.get_list("set-cookie")) == 2
    assert len(upstream.seen) == 1


def test_one_clients_upstream_cookies_never_reach_another_request(forwarding, upstream):
    gateway = forwarding()
    assert len(httpx.get(f"{gateway}/v1/missing").headers.get_list("set-cookie")) == 2
    httpx.get(f"{gateway}/v1/anything")
    assert upstream.seen[-1].header("cookie") == []


def test_redirects_are_returned_not_followed(forwarding, upstream):
    gateway = forwarding()
    response = httpx.get(f"{gateway}/redirect")
    assert response.status_code == 302
    assert response.headers["location"] == "/elsewhere"
    assert [s.path for s in upstream.seen] == ["/redirect"]


def test_encoded_bodies_stay_encoded(forwarding):
    gateway = forwarding()
    response = httpx.get(f"{gateway}/gzip", headers={"accept-encoding": "gzip"})
    assert response.headers["content-encoding"] == "gzip"
    assert response.content == b"hello " * 1000  # httpx decoded it: it arrived intact


def test_large_response_streams_through_intact(forwarding):
    gateway = forwarding()
    digest = hashlib.sha256()
    size = 0
    with httpx.stream("GET", f"{gateway}/big", timeout=30) as response:
        assert response.status_code == 200
        for chunk in response.iter_raw():
            digest.update(chunk)
            size += len(chunk)
    assert size == BIG_CHUNKS * 64 * 1024
    assert digest.hexdigest() == big_digest()


def test_large_chunked_upload_streams_through_intact(forwarding, upstream):
    gateway = forwarding()
    chunks = [bytes([i]) * 1024 * 1024 for i in range(6)]
    response = httpx.post(f"{gateway}/upload", content=iter(chunks), timeout=30)
    assert response.status_code == 200
    assert response.json() == {"ok": True, "size": 6 * 1024 * 1024}
    [seen] = upstream.seen
    assert seen.body == b"".join(chunks)


def test_response_is_relayed_as_it_arrives_not_buffered(forwarding, upstream):
    gateway = forwarding()
    with httpx.stream("GET", f"{gateway}/gated", timeout=5) as response:
        chunks = response.iter_raw()
        # Buffering would hold "first" back until the upstream finished: a read timeout.
        assert next(chunks) == b"first\n"
        upstream.release.set()
        assert b"".join(chunks) == b"last\n"


def test_abandoned_stream_stops_the_upstream(forwarding, upstream):
    gateway = forwarding()
    with httpx.stream("GET", f"{gateway}/endless", timeout=5) as response:
        assert next(response.iter_raw()).startswith(b"data: tick")
    assert upstream.endless_closed.wait(5), "the upstream stream kept running"


def test_upstream_failure_mid_response_cuts_the_client_off(forwarding):
    gateway = forwarding()
    # A clean end would pass the truncated body off as complete.
    with pytest.raises(httpx.RemoteProtocolError):
        httpx.get(f"{gateway}/broken")


def test_head_gets_headers_without_a_body(forwarding, upstream):
    gateway = forwarding()
    response = httpx.head(f"{gateway}/v1/missing")
    assert (response.status_code, response.content) == (404, b"")
    assert upstream.seen[0].method == "HEAD"


def test_upstream_key_replaces_authorization_and_is_never_shown(forwarding, upstream, caplog):
    caplog.set_level(logging.DEBUG)
    gateway = forwarding(environ={"UPSTREAM_KEY": UPSTREAM_KEY}, api_key_env="UPSTREAM_KEY")
    response = httpx.post(
        f"{gateway}/v1/chat/completions",
        content=b"{}",
        headers={"authorization": "Bearer client-own-key"},
    )
    assert response.status_code == 201
    [seen] = upstream.seen
    assert seen.header("authorization") == [f"Bearer {UPSTREAM_KEY}"]
    assert UPSTREAM_KEY not in response.text
    assert UPSTREAM_KEY not in str(response.headers)
    assert UPSTREAM_KEY not in caplog.text


def test_upstream_key_is_sent_even_when_the_client_sends_none(forwarding, upstream):
    gateway = forwarding(environ={"UPSTREAM_KEY": UPSTREAM_KEY}, api_key_env="UPSTREAM_KEY")
    assert httpx.get(f"{gateway}/v1/files").status_code == 200
    assert upstream.seen[0].header("authorization") == [f"Bearer {UPSTREAM_KEY}"]


def test_unset_upstream_key_variable_forwards_the_client_authorization(forwarding, upstream):
    gateway = forwarding(environ={}, api_key_env="UPSTREAM_KEY")
    httpx.get(f"{gateway}/v1/files", headers={"authorization": "Bearer own"})
    assert upstream.seen[0].header("authorization") == ["Bearer own"]


def test_client_keys_guard_forwarded_requests(forwarding, upstream):
    gateway = forwarding(
        environ={"FLUX_PROXY_API_KEYS": "k1", "UPSTREAM_KEY": UPSTREAM_KEY},
        api_key_env="UPSTREAM_KEY",
    )
    missing = httpx.post(f"{gateway}/v1/chat/completions", content=b"{}")
    assert assert_openai_error(missing, 401)["code"] == "missing_api_key"
    wrong = httpx.get(f"{gateway}/v1/files", headers={"authorization": "Bearer k2"})
    assert assert_openai_error(wrong, 401)["code"] == "invalid_api_key"
    assert upstream.seen == []

    ok = httpx.get(f"{gateway}/v1/files", headers={"authorization": "Bearer k1"})
    assert ok.status_code == 200
    assert upstream.seen[0].header("authorization") == [f"Bearer {UPSTREAM_KEY}"]


def test_client_key_is_not_passed_on_to_the_upstream(forwarding, upstream):
    gateway = forwarding(environ={"FLUX_PROXY_API_KEYS": "k1"})
    ok = httpx.get(f"{gateway}/v1/files", headers={"authorization": "Bearer k1"})
    assert ok.status_code == 200
    assert upstream.seen[0].header("authorization") == []


def test_upstream_down_is_502_openai_error(start_gateway, caplog):
    caplog.set_level(logging.DEBUG)
    gateway = start_gateway(
        {"forward": {"base_url": f"http://127.0.0.1:{closed_port()}", "api_key_env": "K"}},
        environ={"K": UPSTREAM_KEY},
    )
    response = httpx.post(f"{gateway}/v1/chat/completions", content=b"{}")
    error = assert_openai_error(response, 502)
    assert error["code"] == "upstream_error"
    assert UPSTREAM_KEY not in response.text
    assert UPSTREAM_KEY not in caplog.text


def test_upstream_too_slow_is_504_openai_error(start_gateway, upstream):
    gateway = start_gateway(
        {"forward": {"base_url": upstream.url}, "limits": {"upstream_timeout": 0.5}}
    )
    response = httpx.get(f"{gateway}/slow", timeout=10)
    assert assert_openai_error(response, 504)["code"] == "upstream_timeout"


def test_image_routes_are_answered_by_the_gateway(forwarding, upstream):
    gateway = forwarding()
    models = httpx.get(f"{gateway}/v1/models")
    assert models.status_code == 200
    assert "flux1.1-pro" in [m["id"] for m in models.json()["data"]]
    assert httpx.get(f"{gateway}/v1/models/flux1.1-pro").status_code == 200
    image = httpx.post(
        f"{gateway}/v1/images/generations",
        json={"model": "flux1.1-pro", "prompt": "a red square", "size": "64x64"},
        timeout=60,
    )
    assert image.status_code == 200, image.text
    assert "data" in image.json()
    assert httpx.get(f"{gateway}/v1/images/generations").status_code == 405
    assert upstream.seen == []


def test_without_base_url_standalone_still_answers_404(start_gateway):
    gateway = start_gateway({})
    response = httpx.post(f"{gateway}/v1/chat/completions", content=b"{}")
    assert assert_openai_error(response, 404)["code"] == "unknown_url"


def test_mounted_mode_falls_through_to_the_host_app(start_gateway, upstream):
    async def host(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        await PlainTextResponse("host app")(scope, receive, send)

    gateway = start_gateway({"forward": {"base_url": upstream.url}}, app=host)
    response = httpx.post(f"{gateway}/v1/chat/completions", content=b"{}")
    assert (response.status_code, response.text) == (200, "host app")
    assert upstream.seen == []


def test_forward_settings_from_the_environment_and_their_validation():
    settings = load_settings(
        environ={
            "FLUX_PROXY_FORWARD__BASE_URL": "https://api.openai.com/",
            "FLUX_PROXY_FORWARD__API_KEY_ENV": "OPENAI_API_KEY",
        }
    )
    assert settings.forward.base_url == "https://api.openai.com"
    assert settings.forward.api_key_env == "OPENAI_API_KEY"
    assert load_settings(environ={}).forward.base_url is None
    for bad in ("api.openai.com", "ftp://host", "https://host/?a=1"):
        with pytest.raises(ConfigError, match=r"forward\.base_url"):
            load_settings(environ={"FLUX_PROXY_FORWARD__BASE_URL": bad})


@pytest.mark.parametrize("target", [b"1/v1/models", b"@localhost:9/v1/x", b".evil.test/v1/x"])
def test_a_request_target_cannot_redirect_the_forward(upstream, target):
    from flux_proxy import FluxProxy

    gateway = FluxProxy(
        {"forward": {"base_url": upstream.url, "api_key_env": "UPSTREAM_KEY"}},
        environ={"UPSTREAM_KEY": "sk-operator-secret"},
    )
    with serve(gateway, http="h11") as url:  # h11 passes such targets on as raw_path
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(b"GET " + target + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
    assert answer.startswith(b"HTTP/1.1 400"), answer[:200]
    assert b"sk-operator-secret" not in answer
    assert upstream.seen == []
