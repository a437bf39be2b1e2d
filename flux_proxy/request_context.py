"""What the gateway knows about the request being served: its id, and how long it waited.

One :class:`RequestContext` is made per HTTP request at the edge and set in a
context variable, so code far from the edge (the upstream transport, the log
filter) can attribute its work to the request without every signature carrying
it. Tasks a request spawns (fan-out, streaming) copy the variable, and so share
the one context object.
"""

from __future__ import annotations

import os
import re
import time
from contextvars import ContextVar, Token
from dataclasses import dataclass, field

REQUEST_ID_HEADER = "x-request-id"
# A client's id is taken only when it is short and plain: it goes into every log line
# and answer header, so no spaces, quotes, control characters or megabytes.
_VALID_REQUEST_ID = re.compile(r"[A-Za-z0-9._:+=-]{1,128}")

# Label values for what is not known (yet): no model named, or one this gateway lacks.
NO_MODEL = ""
UNKNOWN_MODEL = "unknown"
NO_PROVIDER = ""
# An httpx request extension naming who an exchange is with when it is not the
# request's provider (the S3 image store: "s3"); metrics and logs label it so.
PEER_EXTENSION = "flux_proxy.peer"


def request_id_from(header: bytes | None) -> str:
    """The client's ``x-request-id`` when it is valid, else a fresh one."""
    if header is not None:
        text = header.decode("latin-1")
        if _VALID_REQUEST_ID.fullmatch(text):
            return text
    # As random as uuid4's hex and as long, at a fifth of its cost (no UUID object).
    return os.urandom(16).hex()


@dataclass(slots=True)
class RequestContext:
    request_id: str
    # Bounded label values: a configured model name or UNKNOWN_MODEL, a provider's name.
    model: str = NO_MODEL
    provider: str = NO_PROVIDER
    # Seconds during which at least one upstream exchange was under way: parallel calls
    # (fan-out) overlap, so this is the union of their intervals, not their sum.
    upstream_seconds: float = 0.0
    _open_exchanges: int = field(default=0, repr=False)
    _waiting_since: float = field(default=0.0, repr=False)

    def exchange_started(self) -> None:
        if self._open_exchanges == 0:
            self._waiting_since = time.perf_counter()
        self._open_exchanges += 1

    def exchange_ended(self) -> None:
        self._open_exchanges -= 1
        if self._open_exchanges == 0:
            self.upstream_seconds += time.perf_counter() - self._waiting_since


_current: ContextVar[RequestContext | None] = ContextVar("flux_proxy_request", default=None)


def current() -> RequestContext | None:
    """The request being served by this task, if any."""
    return _current.get()


def enter(context: RequestContext) -> Token[RequestContext | None]:
    """Make ``context`` current; pass the returned token to :func:`leave`."""
    return _current.set(context)


def leave(token: Token[RequestContext | None]) -> None:
    _current.reset(token)
