"""SIGTERM to a real ``flux-proxy serve``: not ready at once, in-flight work finishes within
the grace period, new requests get 503 + Retry-After, stragglers end cleanly, and the
process exits in bounded time, whatever its clients do (a slow body included).

Each test runs one gateway process with every kind of client at once, against an
upstream that holds each generation until the test lets it go: what is "in flight" is
known from the upstream's side, never guessed from a sleep. The answers that can only
be cut (half written) are checked in process, on a GracefulServer in a thread.
"""

from __future__ import annotations

import base64
import http.client
import json
import logging
import re
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
import uvicorn
import yaml
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from flux_proxy.drain import Drain
from flux_proxy.serving import GracefulServer
from tests import test_cli
from tests.images import assert_image, make_image
from tests.openapi import assert_openai_error
from tests.servers import ServeUpstream
from tests.sse import read_events
from tests.test_cli import Server, free_port
from tests.waiting import wait_for

spawn = test_cli.spawn  # the fixture that starts `flux-proxy` processes and stops them
BODY = {"model": "held", "prompt": "a lighthouse", "size": "64x48"}
# Generous bounds only: they hold on a machine of any speed, and fail only on a hang.
EXIT_MARGIN_SECONDS = 10.0
# A loaded machine may take many seconds to start Python, the gateway and its plugins.
START_SECONDS = 60.0


class HeldUpstream:
    """An OpenAI Images upstream that answers each generation only once released."""

    def __init__(self) -> None:
        self.arrived = 0
        self.released = threading.Event()

    def app(self) -> Starlette:
        return Starlette(routes=[Route("/v1/images/generations", self._generate, methods=["POST"])])

    async def _generate(self, request: Request) -> Response:
        body = await request.json()
        self.arrived += 1
        await anyio.to_thread.run_sync(self.released.wait)
        width, height = (int(side) for side in body["size"].split("x"))
        encoded = base64.b64encode(make_image("png", (width, height))).decode()
        return JSONResponse({"created": 1, "data": [{"b64_json": encoded}]})


@pytest.fixture
def held(serve_upstream: ServeUpstream) -> Iterator[tuple[HeldUpstream, str]]:
    upstream = HeldUpstream()
    yield upstream, serve_upstream(upstream.app())
    upstream.released.set()  # nothing of this test's keeps the pooled server busy


def start(
    spawn: Callable[..., Server], tmp_path: Path, upstream_url: str, grace: float, *args: str
) -> tuple[Server, str]:
    port = free_port()
    config = {
        "server": {"port": port, "shutdown_grace_seconds": grace},
        "defaults": {"response_format": "b64_json"},
        "models": {"held": {"provider": "openai", "base_url": f"{upstream_url}/v1"}},
        # One the workers of --workers share: the memory store is refused for them.
        "store": {"backend": "directory", "directory": str(tmp_path / "images")},
    }
    path = tmp_path / "flux-proxy.yaml"
    path.write_text(yaml.safe_dump(config))
    server = spawn("serve", "--config", str(path), *args)
    base_url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        assert server.process.poll() is None, server.output()
        try:
            return httpx.get(f"{base_url}/readyz", timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    assert wait_for(ready, START_SECONDS), server.output()
    return server, base_url


def post(base_url: str) -> httpx.Response:
    return httpx.post(f"{base_url}/v1/images/generations", json=BODY, timeout=60)


def stream(base_url: str) -> tuple[httpx.Response, list[dict[str, Any]]]:
    body = {**BODY, "stream": True}
    with httpx.stream("POST", f"{base_url}/v1/images/generations", json=body, timeout=60) as answer:
        return answer, read_events(answer)


def terminate(server: Server) -> float:
    server.process.send_signal(signal.SIGTERM)
    return time.monotonic()


def assert_exits_cleanly(server: Server, signalled: float, grace: float) -> str:
    """The process stops by the bound, as uvicorn does after a signal, with nothing alarming
    in its log; the log."""
    status = server.process.wait(timeout=grace + EXIT_MARGIN_SECONDS)
    assert time.monotonic() - signalled < grace + EXIT_MARGIN_SECONDS
    log = server.output()
    # uvicorn re-raises the signal once it has shut down: killed by SIGTERM, cleanly.
    assert status == -signal.SIGTERM, log
    assert "Application shutdown complete" in log
    assert "Traceback" not in log and "ERROR" not in log, log
    return log


def assert_shutting_down(answer: httpx.Response) -> None:
    error = assert_openai_error(answer, 503)
    assert error["code"] == "shutting_down"
    assert answer.headers["retry-after"] == "1"
    assert answer.headers["connection"] == "close"


def test_in_flight_work_finishes_and_new_requests_get_503(spawn, tmp_path, held):
    upstream, upstream_url = held
    grace = 60.0  # never reached: the test lets the upstream answer well before
    server, base_url = start(spawn, tmp_path, upstream_url, grace)
    with ThreadPoolExecutor(2) as pool:
        answer: Future[httpx.Response] = pool.submit(post, base_url)
        streamed = pool.submit(stream, base_url)
        assert wait_for(lambda: upstream.arrived == 2, 15)
        # A keep-alive connection, asked again and again (each answer restarts uvicorn's
        # 5 s keep-alive timer), idle between two requests when the signal comes.
        kept = http.client.HTTPConnection("127.0.0.1", int(base_url.rsplit(":", 1)[1]), timeout=30)
        kept.request("GET", "/v1/models")
        assert kept.getresponse().read()
        sock = kept.sock
        signalled = terminate(server)

        def refused_on_the_kept_connection() -> bool:
            kept.request("GET", "/v1/models")
            assert kept.sock is sock  # the same connection: it was not closed under it
            answer = kept.getresponse()
            body = answer.read()
            if answer.status == 200:  # the drain has not begun yet
                return False
            assert (answer.status, answer.getheader("Retry-After")) == (503, "1"), body
            assert json.loads(body)["error"]["code"] == "shutting_down"
            return True

        assert wait_for(refused_on_the_kept_connection, 15)
        readiness = httpx.get(f"{base_url}/readyz", timeout=5).json()
        assert readiness["checks"]["lifecycle"] == "shutting down"
        assert httpx.get(f"{base_url}/healthz", timeout=5).status_code == 200  # still alive
        # A new connection in the drain window: answered, not refused.
        assert_shutting_down(post(base_url))

        upstream.released.set()
        finished = answer.result(timeout=30)
        response, events = streamed.result(timeout=30)
    assert finished.status_code == 200, finished.text
    assert finished.headers["connection"] == "close"  # the client comes back on a new one
    assert_image(base64.b64decode(finished.json()["data"][0]["b64_json"]), "png", (64, 48))
    assert response.status_code == 200
    assert [event["type"] for event in events] == [
        "image_generation.completed",
        "flux_proxy.report",
    ]
    log = assert_exits_cleanly(server, signalled, grace)
    # The two held ones, and a GET on the kept connection if one was under way.
    (in_flight,) = re.findall(r"(\d+) request\(s\) in flight", log)
    assert int(in_flight) in (2, 3), log
    assert "grace period over" not in log


def slow_body(base_url: str) -> socket.socket:
    """A client that sends its headers and a little of its body, then nothing more; it
    returns once the gateway is reading that body (uvicorn's 100 Continue says so)."""
    port = int(base_url.rsplit(":", 1)[1])
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(
        b"POST /v1/images/generations HTTP/1.1\r\nHost: gateway\r\n"
        b"Content-Type: application/json\r\nContent-Length: 1000\r\n"
        b"Expect: 100-continue\r\n\r\n"
    )
    assert sock.recv(1024).startswith(b"HTTP/1.1 100 ")
    sock.sendall(b'{"model": "held", ')
    return sock


def read_to_close(sock: socket.socket) -> bytes:
    """Everything the gateway sends until it closes the connection (a reset counts as one)."""
    received = b""
    try:
        while chunk := sock.recv(65536):
            received += chunk
    except ConnectionResetError:
        pass
    return received


def test_stragglers_are_ended_cleanly_when_the_grace_period_is_over(spawn, tmp_path, held):
    upstream, upstream_url = held
    grace = 0.5
    server, base_url = start(spawn, tmp_path, upstream_url, grace)
    with ThreadPoolExecutor(2) as pool:
        answer = pool.submit(post, base_url)
        streamed = pool.submit(stream, base_url)
        trickle = slow_body(base_url)
        assert wait_for(lambda: upstream.arrived == 2, 15)
        signalled = terminate(server)
        # The upstream never answers: each request ends with the shutdown.
        cut = read_to_close(trickle)
        finished = answer.result(timeout=grace + EXIT_MARGIN_SECONDS)
        response, events = streamed.result(timeout=grace + EXIT_MARGIN_SECONDS)
    trickle.close()
    # No answer had started: a well-formed 503 the client may retry elsewhere.
    assert_shutting_down(finished)
    # The stream had started: it ends with an error event, then a proper end of stream.
    assert response.status_code == 200
    assert events[-1]["error"]["code"] == "shutting_down"
    # The slow body holds nothing open: a 503, or the connection closed, and no more.
    assert cut == b"" or cut.startswith(b"HTTP/1.1 503 "), cut
    log = assert_exits_cleanly(server, signalled, grace)
    assert "3 request(s) in flight" in log
    assert "grace period over, ending 3 request(s)" in log


def test_each_worker_drains_and_the_parent_waits_for_them(spawn, tmp_path, held):
    upstream, upstream_url = held
    grace = 0.5
    server, base_url = start(spawn, tmp_path, upstream_url, grace, "--workers", "2")
    # One worker answering is not both: a worker still starting has nothing to drain.
    assert wait_for(lambda: server.output().count("startup complete") == 2, START_SECONDS)
    with ThreadPoolExecutor(2) as pool:
        answers = [pool.submit(post, base_url) for _ in range(2)]
        trickle = slow_body(base_url)
        assert wait_for(lambda: upstream.arrived == 2, 15)
        signalled = terminate(server)
        cut = read_to_close(trickle)
        finished = [answer.result(timeout=grace + EXIT_MARGIN_SECONDS) for answer in answers]
    trickle.close()
    # Whichever worker each request reached, it drained and ended it as one process does.
    for answer in finished:
        assert_shutting_down(answer)
    assert cut == b"" or cut.startswith(b"HTTP/1.1 503 "), cut
    log = assert_exits_cleanly(server, signalled, grace)
    assert log.count("Application shutdown complete") == 2
    ended = re.findall(r"grace period over, ending (\d+) request", log)
    assert sum(int(count) for count in ended) == 3


# --- what is half written when the grace period ends (in process: quick) -------------------


async def _half_written(scope: Scope, receive: Receive, send: Send) -> None:
    """Starts an answer and never finishes it, in the shape its path names."""
    if scope["type"] != "http":
        return
    shapes = {
        "/body": ([(b"content-length", b"100")], b"ten bytes."),
        "/mid-event": ([(b"content-type", b"text/event-stream")], b'data: {"forwarded'),
        "/between-events": ([(b"content-type", b"text/event-stream")], b"data: {}\n\n"),
    }
    headers, first = shapes[scope["path"]]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": first, "more_body": True})
    await anyio.sleep_forever()  # an upstream that never says more


@contextmanager
def graceful_server(app: ASGIApp, drain: Drain, grace: float) -> Iterator[GracefulServer]:
    """A GracefulServer in a thread (no signals there: the test sets should_exit)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    # No log_config: uvicorn would replace the handlers of its loggers, the test's too.
    config = uvicorn.Config(app, lifespan="off", log_config=None)
    server = GracefulServer(config, drain, grace)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    assert wait_for(lambda: server.started, START_SECONDS)
    server.config.port = sock.getsockname()[1]
    try:
        yield server
    finally:
        server.should_exit = True
        thread.join(timeout=grace + EXIT_MARGIN_SECONDS)
        sock.close()
        assert not thread.is_alive()


def read_until_cut(url: str, started: threading.Semaphore) -> tuple[bytes, str | None]:
    """The body read, and the error that ended it (None: a well-formed end)."""
    received = b""
    with httpx.stream("GET", url, timeout=30) as response:
        started.release()
        try:
            for chunk in response.iter_raw():
                received += chunk
        except httpx.RemoteProtocolError as error:
            return received, type(error).__name__
    return received, None


@pytest.fixture
def server_log(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """caplog, with uvicorn's own records too (its loggers may not reach the root's)."""
    uvicorn_errors = logging.getLogger("uvicorn.error")
    uvicorn_errors.addHandler(caplog.handler)
    try:
        yield caplog
    finally:
        uvicorn_errors.removeHandler(caplog.handler)


def test_a_half_written_answer_is_cut_and_a_stream_ends_between_events(server_log):
    drain = Drain(exempt_paths=(), on_begin=lambda: None)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await drain(_half_written, scope, receive, send)

    started = threading.Semaphore(0)
    with graceful_server(app, drain, grace=0.1) as server, ThreadPoolExecutor(3) as pool:
        base_url = f"http://127.0.0.1:{server.config.port}"
        paths = ["/body", "/mid-event", "/between-events"]
        reads = [pool.submit(read_until_cut, base_url + path, started) for path in paths]
        for _ in paths:
            assert started.acquire(timeout=START_SECONDS)
        server.should_exit = True
        body, mid_event, between_events = (
            read.result(timeout=EXIT_MARGIN_SECONDS) for read in reads
        )
    # Nothing more can be said inside a body or an event: the connection is cut.
    assert body == (b"ten bytes.", "RemoteProtocolError")
    assert mid_event[1] == "RemoteProtocolError"
    assert b"shutting_down" not in mid_event[0]
    # Between two events: an error event, then a proper end of the stream.
    received, failure = between_events
    assert failure is None
    last = received.split(b"\n\n")[-2]
    assert last.startswith(b"event: error\ndata: ")
    assert json.loads(last.split(b"data: ", 1)[1])["error"]["code"] == "shutting_down"
    assert "ending 3 request(s)" in server_log.text
    # Nothing alarming: uvicorn logs an answer a handler left half written as an error.
    assert not [record for record in server_log.records if record.levelno >= logging.ERROR]
