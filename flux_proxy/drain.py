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
from dataclasses import dataclass

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from flux_proxy.errors import GatewayError, ShuttingDown

logger = logging.getLogger("flux_proxy")

_CLOSE = (b"connection", b"close")
_EVENT_STREAM = b"text/event-stream"


@dataclass
class _InFlight:
    """What has been answered so far on one request, to end it the right way."""

    task: asyncio.Task[object]
    started: bool = False
    event_stream: bool = False
    # Whether the body so far ends where a server-sent event may begin.
    at_event_boundary: bool = True
    complete: bool = False
    ended: bool = False  # end_stragglers cancelled it


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

    async def __call__(self, app: ASGIApp, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve one HTTP request through ``app``, refusing it if a drain is under way."""
        if self.draining and scope["path"] not in self._exempt:
            await _answer(ShuttingDown(), send)
            return
        task = asyncio.current_task()
        assert task is not None
        entry = _InFlight(task)
        self._in_flight[task] = entry
        self._idle.clear()

        async def tracked_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                entry.started = True
                headers = list(message.get("headers", []))
                entry.event_stream = any(
                    name.lower() == b"content-type" and value.startswith(_EVENT_STREAM)
                    for name, value in headers
                )
                if self.draining and not any(name.lower() == b"connection" for name, _ in headers):
                    message = {**message, "headers": [*headers, _CLOSE]}
            elif message["type"] == "http.response.body":
                body = message.get("body", b"")
                if body:
                    entry.at_event_boundary = body.endswith((b"\n\n", b"\r\n\r\n"))
                entry.complete = not message.get("more_body", False)
            await send(message)

        try:
            await app(scope, receive, tracked_send)
        except asyncio.CancelledError:
            if not entry.ended:
                raise
            task.uncancel()
            await _end(entry, receive, send)
        finally:
            del self._in_flight[task]
            if not self._in_flight:
                self._idle.set()


async def _end(entry: _InFlight, receive: Receive, send: Send) -> None:
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
