"""uvicorn for ``flux-proxy serve``, with a shutdown that drains and is bounded.

Stock uvicorn, told to stop, closes its listener and every idle keep-alive connection
at once (a request already on its way over one meets a closed connection), then
waits for every connection to close, with no limit by default: a client that sends its
body slowly holds the process open forever. ``GracefulServer``, on SIGTERM or SIGINT:

1. begins the gateway's drain (``flux_proxy.drain``): ``/readyz`` answers 503, a new
   request gets 503 with ``Retry-After`` and ``Connection: close``, and every answer
   closes its connection. The listener stays open meanwhile, so a request that comes
   in this window (a load balancer slow to notice) is answered, not refused;
2. waits until no request is in flight, for at most ``server.shutdown_grace_seconds``
   (a second signal ends the wait at once);
3. closes the listener (new connections are refused from here on) and the idle
   connections;
4. ends the requests still in flight, each as cleanly as its state allows, and gives
   them ``ENDING_SECONDS`` to say so;
5. closes every connection left (a client still sending its headers, say), then runs
   the app's lifespan shutdown.

So the process exits about grace + 2 x ``ENDING_SECONDS`` after the signal at the
latest. Like uvicorn, it then re-raises the signal: the exit status is "killed by
SIGTERM" (143 in a shell), which process managers read as a clean stop.

With ``--workers N``, ``Workers`` supervises N such processes on one listening socket
(uvicorn's own supervisor would run its stock server in each, without the drain).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import suppress
from types import FrameType
from typing import Any

import uvicorn

from flux_proxy.drain import Drain

logger = logging.getLogger("flux_proxy")

# What a straggler is given to send its last words, and a handler to see its
# connection closed: a few writes each, so one second is plenty.
ENDING_SECONDS = 1.0
# uvicorn's status when the server could not start (a port in use, say).
STARTUP_FAILURE = 3
# What a worker is given beyond its grace period to exit before it is killed.
WORKER_EXIT_MARGIN_SECONDS = 5.0
# Allocations between two collections of the youngest generation (CPython's default:
# 700). A request makes a few thousand short-lived objects, nearly all freed by their
# reference counts: at 700 the collector ran several times a request, each time walking
# what the requests in flight hold. 4% of a url pass-through's instructions (callgrind).
YOUNG_COLLECTION_THRESHOLD = 10_000


class GracefulServer(uvicorn.Server):
    """uvicorn with the shutdown described in the module docstring."""

    def __init__(
        self,
        config: uvicorn.Config,
        drain: Drain,
        grace_seconds: float,
        *,
        own_process: bool = False,
    ) -> None:
        """``own_process``: the process is this server's alone (``flux-proxy serve``), so
        its garbage collector may be tuned for serving (see ``settle_heap``)."""
        super().__init__(config)
        self._drain = drain
        self._grace = grace_seconds
        self._own_process = own_process
        self._loop: asyncio.AbstractEventLoop | None = None
        self._hurry = asyncio.Event()

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets)
        if self._own_process:
            settle_heap()

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        again = self.should_exit
        super().handle_exit(sig, frame)
        if again and self._loop is not None:
            # Signal handlers run between two steps of the loop: wake it properly.
            self._loop.call_soon_threadsafe(self._hurry.set)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        logger.info(
            "shutting down: not ready; %d request(s) in flight get up to %g s to finish",
            len(self._drain),
            self._grace,
        )
        self._drain.begin()
        finished = await self._drained()
        stop_listening(self, sockets)
        if not finished:
            ended = self._drain.end_stragglers()
            logger.warning("shutdown: grace period over, ending %d request(s)", ended)
            await self._drain.idle(ENDING_SECONDS)
        for connection in list(self.server_state.connections):
            connection.transport.close()
        if not await self._drain.idle(ENDING_SECONDS):
            # A handler that ignores its ending: uvicorn's own cancel, as a last resort.
            for task in self.server_state.tasks:
                task.cancel("the shutdown is over")
        if not self.force_exit:
            await self.lifespan.shutdown()

    async def _drained(self) -> bool:
        """Wait for the requests in flight, at most the grace period or until a second signal."""
        waits = [
            asyncio.ensure_future(self._drain.idle(self._grace)),
            asyncio.ensure_future(self._hurry.wait()),
        ]
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        for wait in waits:
            wait.cancel()
        return len(self._drain) == 0


def settle_heap() -> None:
    """Tune the collector for serving, once everything start-up made is in place.

    What start-up made (modules, schemas, the app) lives as long as the process: frozen,
    it is no longer walked by every full collection (3.5% of a url pass-through's
    instructions). The youngest generation is collected less often (see
    YOUNG_COLLECTION_THRESHOLD); the older ones keep CPython's ratios."""
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(YOUNG_COLLECTION_THRESHOLD, older, oldest)


def stop_listening(server: uvicorn.Server, sockets: list[socket.socket] | None) -> None:
    """Refuse new connections and close the idle ones; busy ones close after their answer."""
    for listener in server.servers:
        listener.close()
    for sock in sockets or []:
        sock.close()
    for connection in list(server.server_state.connections):
        connection.shutdown()


def run(
    app: Any,
    drain: Drain,
    grace_seconds: float,
    sockets: list[socket.socket] | None = None,
    **options: Any,
) -> int:
    """Serve ``app`` until a signal stops it (``options`` as ``uvicorn.Config``'s); the status."""
    server = GracefulServer(uvicorn.Config(app, **options), drain, grace_seconds, own_process=True)
    with suppress(KeyboardInterrupt):  # a second Ctrl-C while the loop winds down
        server.run(sockets)
    return 0 if server.started else STARTUP_FAILURE


def listen(app: Any, host: str, port: int, log_level: str) -> socket.socket:
    """The listening socket ``Workers`` share, bound as uvicorn binds its own."""
    return uvicorn.Config(app, host=host, port=port, log_level=log_level).bind_socket()


class Workers:
    """``count`` worker processes serving one listening socket, each a ``GracefulServer``.

    ``command`` starts one worker given ``--fd N``, the inherited socket's descriptor. The
    parent only supervises: it starts a new worker when one dies, and on SIGTERM or
    SIGINT passes the signal on to every worker (a second one too: it ends their grace
    period), waits for them, at most the grace period plus a margin, kills any left,
    then re-raises the signal, as one process would. Workers run in their own process
    group, so a terminal's Ctrl-C reaches the parent alone and each worker hears it once.
    """

    def __init__(
        self, command: Sequence[str], count: int, sock: socket.socket, grace_seconds: float
    ) -> None:
        self._command = [*command, "--fd", str(sock.fileno())]
        self._count = count
        self._sock = sock
        self._grace = grace_seconds
        self._signals: list[int] = []
        self._wake = threading.Event()

    def run(self, cleanup: Callable[[], None] = lambda: None) -> int:
        """Supervise until the workers are done; ``cleanup`` runs once they are, before
        the signal is re-raised (which ends this process on the spot)."""
        handled = (signal.SIGTERM, signal.SIGINT)
        previous = {sig: signal.signal(sig, self._on_signal) for sig in handled}
        try:
            status = self._supervise()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            cleanup()
        if self._signals:
            with suppress(KeyboardInterrupt):  # SIGINT's own handler raises it
                signal.raise_signal(self._signals[0])
        return status

    def _on_signal(self, sig: int, frame: FrameType | None) -> None:
        self._signals.append(sig)
        self._wake.set()

    def _start(self) -> subprocess.Popen[bytes]:
        # The command is this program's own (cli.py), not input from anyone.
        return subprocess.Popen(  # noqa: S603
            self._command, pass_fds=[self._sock.fileno()], process_group=0
        )

    def _supervise(self) -> int:
        workers = [self._start() for _ in range(self._count)]
        logger.info("started %d workers: %s", self._count, ", ".join(str(w.pid) for w in workers))
        status = 0
        while not self._wake.wait(0.5):
            for index, worker in enumerate(workers):
                code = worker.poll()
                if code is None:
                    continue
                if code > 0:  # it could not start, and would fail the same way again
                    logger.error("worker %d could not start: stopping", worker.pid)
                    self._wake.set()
                    status = code
                    break
                logger.warning("worker %d exited (status %s): starting another", worker.pid, code)
                workers[index] = self._start()
        self._stop(workers)
        return status

    def _stop(self, workers: list[subprocess.Popen[bytes]]) -> None:
        # The workers' copies of the socket keep it listening while they drain; once they
        # have all closed theirs, connections are refused, not queued for nobody.
        self._sock.close()
        deadline = time.monotonic() + self._grace + WORKER_EXIT_MARGIN_SECONDS
        if not self._signals:  # a worker failed: stop the others
            for worker in workers:
                if worker.poll() is None:
                    worker.terminate()
        passed_on = 0
        while any(worker.poll() is None for worker in workers):
            for sig in self._signals[passed_on:]:
                for worker in workers:
                    if worker.poll() is None:
                        worker.send_signal(sig)
            passed_on = len(self._signals)
            if time.monotonic() > deadline:
                break
            self._wake.clear()
            self._wake.wait(0.1)
        for worker in workers:
            if worker.poll() is None:
                logger.error("worker %d did not stop in time: killing it", worker.pid)
                worker.kill()
            worker.wait()
