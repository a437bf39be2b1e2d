"""Draining: finishing the requests in flight while a shutdown refuses new ones.

The server (``flux_proxy.serving``) drives it. ``begin()`` when the process is told to
stop: from then on a new request is answered 503 with ``Retry-After`` and
``Connection: close`` in OpenAI's error shape (probes excepted: ``/readyz`` says why it
is not ready), and every answer closes its connection, so clients come back on a new
one, which the load balancer sends elsewhere. ``idle()`` waits for the requests in
flight to finish; when the grace period runs out, ``end_stragglers()`` stops the rest,
each with the cleanest ending its state allows:

- no answer started: the same 503, so the client knows it may retry;
- a server-sent event stream started, between two events: an ``error`` event, then
  the stream's end (the official SDK raises it);
- anything else partly written (an answer's body, a forwarded stream mid-event):
  nothing more can be said in HTTP; the handler waits for the server to close the
  connection, so the client sees it cut, never a well-formed but short answer.

ASGI servers cancel stragglers themselves and log each with a traceback; here the
cancel is caught where the request entered the gateway, so nothing is logged but one
line per shutdown.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from contextlib import suppress

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from flux_proxy.deadline import running_task
from flux_proxy.errors import GatewayError, ShuttingDown

logger = logging.getLogger("flux_proxy")

_CLOSE = (b"connection", b"close")
_EVENT_STREAM = b"text/event-stream"


class _InFlight:
    """One request in flight: what has been answered so far, to end it the right way,
    and the one ``send`` every message of its answer goes through.

    That ``send`` also puts the request's own headers (its id) on the answer, unless
    the answer names them itself, and ``Connection: close`` on one started while the
    gateway drains: one wrapper per request, not one per concern, as it runs for every
    message of every answer.
    """

    __slots__ = (
        "_drain",
        "_headers",
        "_send",
        "at_event_boundary",
        "complete",
        "ended",
        "event_stream",
        "started",
        "task",
    )

    def __init__(
        self,
        drain: Drain,
        task: asyncio.Task[object],
        send: Send,
        headers: tuple[tuple[bytes, bytes], ...],
    ) -> None:
        self._drain = drain
        self._send = send
        self._headers = headers
        self.task = task
        self.started = False
        self.event_stream = False
        # Whether the body so far ends where a server-sent event may begin.
        self.at_event_boundary = True
        self.complete = False
        self.ended = False  # end_stragglers cancelled it

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.started = True
            headers = message.get("headers", ())
            names = set()
            for name, value in headers:
                lowered = name.lower()
                names.add(lowered)
                if lowered == b"content-type":
                    self.event_stream = value.startswith(_EVENT_STREAM)
            added = [_CLOSE] if self._drain.draining and b"connection" not in names else []
            added += [header for header in self._headers if header[0] not in names]
            if added:
                message = {**message, "headers": [*headers, *added]}
        elif message["type"] == "http.response.body":
            body = message.get("body", b"")
            if body:
                self.at_event_boundary = body.endswith((b"\n\n", b"\r\n\r\n"))
            self.complete = not message.get("more_body", False)
        await self._send(message)


class Drain:
    """Tracks the HTTP requests in flight through one gateway; see the module docstring."""

    def __init__(self, *, exempt_paths: Iterable[str], on_begin: Callable[[], None]) -> None:
        self._exempt = frozenset(exempt_paths)
        self._on_begin = on_begin
        self._in_flight: dict[asyncio.Task[object], _InFlight] = {}
        self._idle = asyncio.Event()
        self._idle.set()
        self.draining = False

    def __len__(self) -> int:
        return len(self._in_flight)

    def begin(self) -> None:
        if not self.draining:
            self.draining = True
            self._on_begin()

    def reset(self) -> None:
        """Serve normally again (a host app's lifespan that runs anew)."""
        self.draining = False

    async def idle(self, seconds: float) -> bool:
        """Wait until no request is in flight, at most ``seconds``; whether none is."""
        with suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), seconds)
        return not self._in_flight

    def end_stragglers(self) -> int:
        """Stop every request still in flight (see the module docstring); how many."""
        stragglers = [entry for entry in self._in_flight.values() if not entry.ended]
        for entry in stragglers:
            entry.ended = True
            entry.task.cancel("the shutdown grace period is over")
        return len(stragglers)

    async def __call__(
        self,
        app: ASGIApp,
        scope: Scope,
        receive: Receive,
        send: Send,
        headers: tuple[tuple[bytes, bytes], ...] = (),
    ) -> None:
        """Serve one HTTP request through ``app``, refusing it if a drain is under way.
        Every answer carries ``headers`` (lower-case names) unless it names them itself."""
        task = running_task()
        entry = _InFlight(self, task, send, headers)
        if self.draining and scope["path"] not in self._exempt:
            await _answer(ShuttingDown(), entry.send)
            return
        self._in_flight[task] = entry
        self._idle.clear()
        try:
            await app(scope, receive, entry.send)
        except asyncio.CancelledError:
            if not entry.ended:
                raise
            task.uncancel()
            await _end(entry, receive)
        finally:
            del self._in_flight[task]
            if not self._in_flight:
                self._idle.set()


async def _end(entry: _InFlight, receive: Receive) -> None:
    send = entry.send
    if entry.complete:
        return
    if not entry.started:
        await _answer(ShuttingDown(), send)
    elif entry.event_stream and entry.at_event_boundary:
        error = ShuttingDown()
        event = b"event: error\ndata: " + error.body_bytes() + b"\n\n"
        await send({"type": "http.response.body", "body": event, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
    else:
        # Returning now would leave the server to log a half-sent answer: wait for it to
        # close the connection instead (it does right after ending the stragglers).
        while (await receive())["type"] != "http.disconnect":
            pass


async def _answer(error: GatewayError, send: Send) -> None:
    body = error.body_bytes()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(name.lower().encode(), value.encode()) for name, value in error.headers.items()]
    await send({"type": "http.response.start", "status": error.status_code, "headers": headers})
    await send({"type": "http.response.body", "body": body})
