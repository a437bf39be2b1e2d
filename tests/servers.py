"""Real HTTP servers on loopback for the tests: uvicorn in a thread, on a free port.

The suite starts and stops hundreds of these, so stopping must not cost what it costs
a production server. Stock uvicorn notices ``should_exit`` on a 0.1 s tick, then sleeps
0.1 s unconditionally and polls its connections and tasks every 0.1 s, waiting for a
handler that is still sleeping (a "slow upstream" whose client already gave up) to
finish. ``_PromptServer`` wakes as soon as it is asked to stop, closes idle keep-alive
connections at once, gives in-flight requests a short grace period and then cancels
them; the app's lifespan shutdown still runs, so clean-up code stays exercised.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Any, Literal

import uvicorn
from starlette.responses import PlainTextResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from flux_proxy.serving import stop_listening

# How long a test server lets in-flight requests finish before it cancels them: long
# enough for a response already being written, short next to a handler that sleeps.
GRACE_SECONDS = 0.25


async def settle(tasks: set[asyncio.Task[Any]], reason: str) -> None:
    """Let ``tasks`` finish for a moment, then cancel the rest and let them unwind."""
    if tasks:
        await asyncio.wait(list(tasks), timeout=GRACE_SECONDS)
    for task in list(tasks):
        task.cancel(reason)
    if tasks:
        await asyncio.wait(list(tasks), timeout=GRACE_SECONDS)


class _PromptServer(uvicorn.Server):
    """uvicorn that stops as soon as it is asked to (see the module docstring)."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.loop: asyncio.AbstractEventLoop | None = None
        self._wake = asyncio.Event()

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        self.loop = asyncio.get_running_loop()
        await super().startup(sockets)

    def stop(self) -> None:
        """Ask the server to stop; safe to call from any thread."""
        self.should_exit = True
        if self.loop is not None and not self.loop.is_closed():
            # RuntimeError: the loop closed between the check and the call.
            with suppress(RuntimeError):
                self.loop.call_soon_threadsafe(self._wake.set)

    async def main_loop(self) -> None:
        counter = 0
        # on_tick refreshes the Date header every 10th tick; one tick a second keeps it
        # current without uvicorn's ten wake-ups a second.
        while not await self.on_tick(counter):
            counter = (counter + 10) % 864000
            with suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=1.0)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        stop_listening(self, sockets)
        state = self.server_state
        await settle(state.tasks, "test server stopping")
        for connection in list(state.connections):
            # A connection whose handler was cancelled is still open: close it.
            connection.transport.close()
        await self.lifespan.shutdown()


@dataclass
class _Running:
    server: _PromptServer
    thread: threading.Thread
    sock: socket.socket
    url: str

    def call(self, coroutine: Coroutine[Any, Any, None]) -> None:
        """Run ``coroutine`` on the server's own event loop and wait for it."""
        loop = self.server.loop
        assert loop is not None, "the server has not started"
        asyncio.run_coroutine_threadsafe(coroutine, loop).result(timeout=10)

    def stop(self) -> None:
        self.server.stop()
        self.thread.join(timeout=10)
        self.sock.close()


def _start(app: ASGIApp, http: str = "auto", lifespan: Literal["on", "off"] = "on") -> _Running:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", lifespan=lifespan, http=http)
    server = _PromptServer(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("test server did not start")
        time.sleep(0.002)
    return _Running(server, thread, sock, f"http://127.0.0.1:{port}")


def free_port() -> int:
    """A port free on loopback now, for a server this test starts as a separate program."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextmanager
def serve(app: ASGIApp, http: str = "auto") -> Iterator[str]:
    """Run ``app`` under uvicorn on 127.0.0.1 and yield its base URL.

    ``http="h11"`` picks the pure-Python parser, which passes odd request targets on.
    """
    running = _start(app, http)
    try:
        yield running.url
    finally:
        running.stop()


class _Plug:
    """The app a pooled server runs: each request goes to the app plugged in now."""

    def __init__(self) -> None:
        self.app: ASGIApp | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        app = self.app
        if app is None:  # a straggler from a test that has ended
            await PlainTextResponse("no test is using this server", 503)(scope, receive, send)
            return
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await app(scope, receive, send)
        finally:
            self._tasks.discard(task)

    async def drain(self, server: uvicorn.Server) -> None:
        """Let the unplugged app's requests finish (briefly), cancel the rest, drop
        idle keep-alive connections: the next test starts on a quiet server."""
        await settle(self._tasks, "the test using this server ended")
        for connection in list(server.server_state.connections):
            connection.shutdown()


# What the ``serve_upstream`` fixture gives a test: serve this app, get its base URL.
ServeUpstream = Callable[[ASGIApp], str]


class ServerPool:
    """Loopback servers kept for the whole session, lent to one test at a time.

    Starting and stopping uvicorn is most of what a small upstream test costs. A test
    plugs a fresh app (a new emulator, a new recorder) into a lent server, so no
    state of one test's upstream can reach the next; when the test ends the app is
    unplugged, its requests are drained and its connections closed. For apps that
    need no lifespan (the emulators and recorders): a pooled server runs none.
    """

    def __init__(self) -> None:
        self._idle: list[tuple[_Running, _Plug]] = []
        self._all: list[_Running] = []

    @contextmanager
    def serve(self, app: ASGIApp) -> Iterator[str]:
        """Serve ``app`` on a lent server until the block ends; yields the base URL."""
        if self._idle:
            running, plug = self._idle.pop()
        else:
            plug = _Plug()
            running = _start(plug, lifespan="off")
            self._all.append(running)
        plug.app = app
        try:
            yield running.url
        finally:
            plug.app = None
            running.call(plug.drain(running.server))
            self._idle.append((running, plug))

    def close(self) -> None:
        for running in self._all:
            running.stop()
        self._all.clear()
        self._idle.clear()
