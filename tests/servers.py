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
from collections.abc import Iterator
from contextlib import contextmanager, suppress

import uvicorn
from starlette.types import ASGIApp

# How long a test server lets in-flight requests finish before it cancels them: long
# enough for a response already being written, short next to a handler that sleeps.
GRACE_SECONDS = 0.25


class _PromptServer(uvicorn.Server):
    """uvicorn that stops as soon as it is asked to (see the module docstring)."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake = asyncio.Event()

    def stop(self) -> None:
        """Ask the server to stop; safe to call from any thread."""
        self.should_exit = True
        if self._loop is not None and not self._loop.is_closed():
            # RuntimeError: the loop closed between the check and the call.
            with suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._wake.set)

    async def main_loop(self) -> None:
        self._loop = asyncio.get_running_loop()
        counter = 0
        # on_tick refreshes the Date header every 10th tick; one tick a second keeps it
        # current without uvicorn's ten wake-ups a second.
        while not await self.on_tick(counter):
            counter = (counter + 10) % 864000
            with suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=1.0)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        for server in self.servers:
            server.close()
        for sock in sockets or []:
            sock.close()
        # Idle keep-alive connections close now; busy ones close after their response.
        for connection in list(self.server_state.connections):
            connection.shutdown()
        state = self.server_state
        if state.tasks:
            await asyncio.wait(list(state.tasks), timeout=GRACE_SECONDS)
        for task in list(state.tasks):
            task.cancel("test server stopping")
        if state.tasks:
            await asyncio.wait(list(state.tasks), timeout=GRACE_SECONDS)
        for connection in list(state.connections):
            # A connection whose handler was cancelled is still open: close it.
            connection.transport.close()
        await self.lifespan.shutdown()


@contextmanager
def serve(app: ASGIApp, http: str = "auto") -> Iterator[str]:
    """Run ``app`` under uvicorn on 127.0.0.1 and yield its base URL.

    ``http="h11"`` picks the pure-Python parser, which passes odd request targets on.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", lifespan="on", http=http)
    server = _PromptServer(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("test server did not start")
        time.sleep(0.002)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()
        thread.join(timeout=10)
        sock.close()
