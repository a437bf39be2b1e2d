"""The HTTP/1.1 protocol ``flux-proxy serve`` runs: uvicorn's httptools one, with a
request head that must arrive in time and in bounds.

uvicorn closes an idle keep-alive connection (``timeout_keep_alive``, 5 s) and,
with its h11 parser only, caps a head's size (``h11_max_incomplete_event_size``,
16 KiB). It gives a head all the time in the world, though: a connection that
sends its headers a byte at a time, or never sends any, is held open for ever;
and with httptools, the parser it runs when installed, a head of any size is read
(2 MB of headers were answered 200 when tried). Here a connection must deliver
each request head within ``limits.client_header_timeout`` of opening or of its
last answer (then 408, as nginx's ``client_header_timeout``; a connection that
sent no byte of one is just closed), and no bigger than
``h11_max_incomplete_event_size`` (then 431); either way the connection is
closed. A request body's deadline is the gateway's own
(``limits.client_body_timeout``, flux_proxy/app.py), so it holds when mounted too.
"""

from __future__ import annotations

import asyncio
import functools
from typing import Any, cast

from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from flux_proxy.errors import GatewayError, InvalidRequest, RequestTimeout


def _refusal(error: GatewayError, reason: str) -> bytes:
    """A complete HTTP/1.1 answer carrying ``error``, closing the connection."""
    body = error.body_bytes()
    head = (
        f"HTTP/1.1 {error.status_code} {reason}\r\n"
        "content-type: application/json\r\n"
        f"content-length: {len(body)}\r\n"
        "connection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


_TOO_SLOW = _refusal(
    RequestTimeout("The request's headers did not arrive in time."), "Request Timeout"
)
_TOO_BIG = _refusal(
    InvalidRequest(
        "The request's headers are larger than the gateway accepts.",
        code="request_headers_too_large",
        status_code=431,
    ),
    "Request Header Fields Too Large",
)


class _HeadGuard:
    """One connection's wait for a request head: a deadline, and the bytes it has taken.

    The timer is not cancelled when a head arrives nor made anew for the next wait, as
    a timer per request would be on a keep-alive connection: the deadline moves, and
    the one timer, when it fires, follows it (fired after a head came and before the
    next is due, it lapses, and the next wait sets one again).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, seconds: float, max_bytes: int) -> None:
        self._loop = loop
        self._seconds = seconds
        self._max_bytes = max_bytes
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0  # the loop time it fires at
        self._due: float | None = None  # the awaited head's deadline; None: none awaited
        self._received = 0

    def awaiting(self, transport: asyncio.Transport) -> None:
        """A head is due now: from here it has ``seconds`` to arrive."""
        self._received = 0
        self._due = self._loop.time() + self._seconds
        if self._timer is None:
            self._set_timer(transport, self._due)

    def _set_timer(self, transport: asyncio.Transport, when: float) -> None:
        self._timer_at = when
        self._timer = self._loop.call_at(when, self._fired, transport)

    def _fired(self, transport: asyncio.Transport) -> None:
        self._timer = None
        if self._due is None:
            return
        if self._due > self._timer_at:  # a later wait began: follow its deadline
            self._set_timer(transport, self._due)
            return
        self._due = None
        if self._received:
            _refuse(transport, _TOO_SLOW)
        else:
            # Not a byte of a request: an idle connection, closed without a word. An
            # answer here would be read as the answer to the next request sent on it.
            transport.close()

    def arrived(self) -> None:
        self._due = None
        self._received = 0

    def closed(self) -> None:
        """The connection is gone: nothing is awaited on it any more."""
        self.arrived()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def fits(self, transport: asyncio.Transport, size: int) -> bool:
        """Count ``size`` more bytes towards an awaited head; False (and the
        connection refused) once the head has taken more than its bound. Bytes
        after the head in the same chunk count too, so a head is refused only when
        it was already over its bound before this chunk."""
        if self._due is None:
            return True
        if self._received > self._max_bytes:
            self.arrived()
            _refuse(transport, _TOO_BIG)
            return False
        self._received += size
        return True


# h11's own bound on a head when uvicorn is given none (16 KiB).
_H11_DEFAULT_HEAD_BYTES = 16 * 1024


def _head_bytes(config: Config) -> int:
    """The largest head: uvicorn's h11 bound, the same whichever the parser."""
    return config.h11_max_incomplete_event_size or _H11_DEFAULT_HEAD_BYTES


def _refuse(transport: asyncio.Transport, answer: bytes) -> None:
    if not transport.is_closing():
        transport.write(answer)
        transport.close()


class HttpToolsWithHeadGuard(HttpToolsProtocol):
    """uvicorn's httptools protocol (its default, and a dependency of ours through
    ``uvicorn[standard]``) with the head guard."""

    def __init__(self, *args: Any, head_timeout: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head = _HeadGuard(self.loop, head_timeout, _head_bytes(self.config))

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head.awaiting(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self._head.closed()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._head.fits(self.transport, len(data)):
            super().data_received(data)

    def on_headers_complete(self) -> None:
        self._head.arrived()
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        # A pipelined request next has its head already: nothing to wait for.
        awaiting = not self.pipeline
        super().on_response_complete()
        if awaiting and not self.transport.is_closing():
            self._head.awaiting(self.transport)


def http_protocol(head_timeout: float) -> type[asyncio.Protocol]:
    """What ``flux-proxy serve`` gives uvicorn's ``http=``: the guarded protocol.

    A partial of a module-level class, not a class made here: with several workers
    uvicorn pickles its config, and a partial of an importable class pickles."""
    # uvicorn calls it as it calls a class: with config, server_state, app_state, _loop.
    return cast(
        "type[asyncio.Protocol]",
        functools.partial(HttpToolsWithHeadGuard, head_timeout=head_timeout),
    )
