"""The network the gateway runs in stays closed, over real loopback connections:
credentials in a URL are never sent, a DNS name cannot rebind between the address
check and the connection, and a stale keep-alive connection costs an idempotent GET
one retry and a POST none."""

from __future__ import annotations

import socket
import socketserver
import threading
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from aiohttp.abc import AbstractResolver, ResolveResult
from starlette.types import Receive, Scope, Send

from flux_proxy.config import Settings
from flux_proxy.runtime import Runtime
from tests.openapi import assert_openai_error
from tests.upstream_openai import RecordingUpstream, gateway_config


class HeaderRecorder:
    """Answers 200 ``ok`` to anything; keeps every request's headers."""

    def __init__(self) -> None:
        self.headers: list[dict[str, str]] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.headers.append({k.decode(): v.decode() for k, v in scope["headers"]})
        while (await receive()).get("more_body"):
            pass
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})


def generate(gateway: str, **body: Any) -> httpx.Response:
    payload = {"model": "up", "prompt": "x", "size": "16x16", "response_format": "b64_json"}
    return httpx.post(f"{gateway}/v1/images/generations", json={**payload, **body}, timeout=30)


# --- credentials in a URL ---------------------------------------------------------------


def test_an_image_url_with_credentials_is_refused_and_never_requested(
    serve_upstream, start_gateway
):
    recorder = RecordingUpstream()
    url = serve_upstream(recorder.app())
    # The upstream's own (trusted) origin, with user:pass@ written into the answer.
    recorder.url_base = url.replace("http://", "http://user:secret@")
    response = generate(start_gateway(gateway_config(url)))
    error = assert_openai_error(response, 502)
    assert "credentials" in error["message"], error
    assert "secret" not in response.text
    assert recorder.downloads == []


@pytest.mark.anyio
async def test_the_client_never_turns_userinfo_into_an_authorization_header(serve_upstream):
    """Whatever path a URL with user:pass@ takes, the host sees no Authorization."""
    recorder = HeaderRecorder()
    url = serve_upstream(recorder)
    runtime = Runtime(Settings(), environ={})
    try:
        answer = await runtime.http.get(url.replace("http://", "http://user:secret@") + "/x")
    finally:
        await runtime.aclose()
    assert answer.status_code == 200
    assert [headers.get("authorization") for headers in recorder.headers] == [None]


# --- DNS rebinding -----------------------------------------------------------------------

# Public to the first lookup (an address the check passes; nothing here connects to it).
PUBLIC = "93.184.215.14"
NAME = "rebind.test"


class RebindingDns(AbstractResolver):
    """A DNS server with one name of its own, as a rebinding attacker runs: ``NAME``
    answers ``first`` to the first lookup and loopback to every later one. It stands
    in for the DNS layer only: the connections it sends to loopback are real."""

    def __init__(self, first: str = PUBLIC) -> None:
        self._first = first
        self.answers: list[str] = []

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        if host != NAME:
            raise OSError(f"{host}: no such name here")
        address = self._first if not self.answers else "127.0.0.1"
        self.answers.append(address)
        answer: ResolveResult = {
            "hostname": host,
            "host": address,
            "port": port,
            "family": socket.AF_INET,
            "proto": socket.IPPROTO_TCP,
            "flags": socket.AI_NUMERICHOST,
        }
        return [answer]

    async def close(self) -> None:
        pass


@pytest.fixture
def dns() -> RebindingDns:
    return RebindingDns()


def named(url: str) -> str:
    """``url`` (on 127.0.0.1) with the rebinding name instead of the address."""
    return url.replace("127.0.0.1", NAME)


def test_a_name_that_rebinds_to_loopback_after_the_check_is_never_fetched(
    dns, serve_upstream, start_gateway
):
    recorder = RecordingUpstream()
    url = serve_upstream(recorder.app())
    recorder.url_base = named(url)  # the real loopback server, by a name
    response = generate(start_gateway(gateway_config(url), resolver=lambda: dns))
    error = assert_openai_error(response, 502)
    assert recorder.downloads == [], error
    # The check saw the public answer; the connection asked again and got loopback.
    assert dns.answers[:2] == [PUBLIC, "127.0.0.1"], (dns.answers, error)


@pytest.mark.anyio
async def test_every_connection_checks_the_address_it_connects_to(dns, serve_upstream):
    """Provider URLs (submits, polls) go through the same client: a name answering
    loopback to the connection is refused there, with nothing sent."""
    recorder = HeaderRecorder()
    url = named(serve_upstream(recorder))
    dns.answers.append("(no public answer first)")
    runtime = Runtime(Settings(), environ={}, resolver=lambda: dns)
    try:
        with pytest.raises(httpx.ConnectError):
            await runtime.http.post(f"{url}/v1/images/generations", json={"prompt": "x"})
    finally:
        await runtime.aclose()
    assert recorder.headers == []


@pytest.mark.anyio
async def test_a_trusted_name_connects_to_its_private_address_by_name(dns, serve_upstream):
    recorder = HeaderRecorder()
    url = named(serve_upstream(recorder))
    dns.answers.append("(no public answer first)")
    runtime = Runtime(
        Settings(fetch={"allow_private_hosts": [NAME]}), environ={}, resolver=lambda: dns
    )
    try:
        answer = await runtime.http.get(f"{url}/x")
    finally:
        await runtime.aclose()
    assert answer.status_code == 200
    # The address came from the resolver; the Host header is still the name.
    assert [headers["host"] for headers in recorder.headers] == [urlsplit(url).netloc]


# --- stale keep-alive connections --------------------------------------------------------


class StaleKeepAliveServer:
    """A real HTTP/1.1 server on loopback whose keep-alive connections go stale: each
    connection answers its first request (keep-alive, nothing says otherwise) and is
    closed, unanswered, when a second request arrives on it, as when a server's idle
    timeout fires just as the client reuses the connection. Counts what it receives."""

    def __init__(self) -> None:
        self.requests: list[str] = []  # method of every request received, in order
        self.connections = 0
        self._server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True).start()

    def _handler(self) -> type[socketserver.StreamRequestHandler]:
        server = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                server.connections += 1
                answered = False
                while (method := _read_request(self.rfile)) is not None:
                    server.requests.append(method)
                    if answered:
                        return  # stale: closed with the request unanswered
                    self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                    self.wfile.flush()
                    answered = True

        return Handler

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def _read_request(rfile: Any) -> str | None:
    """One request's method, its head and body read; None at the end of the stream."""
    line = rfile.readline()
    if not line:
        return None
    length = 0
    while (header := rfile.readline()) not in (b"\r\n", b"\n", b""):
        name, _, value = header.decode("latin-1").partition(":")
        if name.strip().lower() == "content-length":
            length = int(value)
    rfile.read(length)
    return str(line.split(b" ", 1)[0].decode())


@pytest.fixture
def stale_server() -> Iterator[StaleKeepAliveServer]:
    server = StaleKeepAliveServer()
    try:
        yield server
    finally:
        server.close()


@pytest.mark.anyio
async def test_a_get_on_a_stale_connection_is_retried_once(stale_server):
    runtime = Runtime(Settings(), environ={})
    try:
        answers = [await runtime.http.get(f"{stale_server.url}/poll") for _ in range(2)]
    finally:
        await runtime.aclose()
    assert [answer.text for answer in answers] == ["ok", "ok"]
    # The second GET went out twice: on the stale connection, then on a fresh one.
    assert stale_server.requests == ["GET", "GET", "GET"]
    assert stale_server.connections == 2


@pytest.mark.anyio
async def test_a_post_on_a_stale_connection_is_never_resent(stale_server):
    runtime = Runtime(Settings(), environ={})
    try:
        first = await runtime.http.post(f"{stale_server.url}/submit", json={"prompt": "x"})
        with pytest.raises(httpx.TransportError):
            await runtime.http.post(f"{stale_server.url}/submit", json={"prompt": "x"})
    finally:
        await runtime.aclose()
    assert first.text == "ok"
    # A submit may have been acted on before the connection closed: it is sent once.
    assert stale_server.requests == ["POST", "POST"]


def test_a_refused_image_url_fails_over_to_the_next_provider(serve_upstream, start_gateway):
    tricky, honest = RecordingUpstream(), RecordingUpstream()
    tricky_url = serve_upstream(tricky.app())
    tricky.url_base = tricky_url.replace("http://", "http://user:secret@")
    entries = [
        gateway_config(url)["models"]["up"] for url in (tricky_url, serve_upstream(honest.app()))
    ]
    response = generate(start_gateway({"models": {"up": {"providers": entries}}}))
    assert response.status_code == 200, response.text
    assert (len(tricky.requests), tricky.downloads, len(honest.downloads)) == (1, [], 1)
