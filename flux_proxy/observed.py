"""Every upstream HTTP exchange, timed, counted and logged, whoever makes it.

All upstream I/O (providers' calls, polls, image downloads, the forwarder) goes
through the one httpx client, so its transport is the one place to watch it.
An exchange lasts from sending the request to closing the answer's body: a 4 MB
download is waiting on the upstream too. The request being served (if any) is
told when exchanges start and end, which is how its own overhead is known.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator

import httpx

from flux_proxy.answer_body import WholeBody
from flux_proxy.logs import EVENT, log_url
from flux_proxy.metrics import CounterSeries, HistogramSeries, Metrics
from flux_proxy.request_context import PEER_EXTENSION, RequestContext, current
from flux_proxy.transport import AiohttpTransport, WireAnswer

logger = logging.getLogger("flux_proxy.upstream")

NO_ANSWER = "error"  # the status label of an exchange that got no answer


class ObservedTransport(httpx.AsyncBaseTransport):
    def __init__(self, inner: httpx.AsyncBaseTransport, metrics: Metrics) -> None:
        self._inner = inner
        # The gateway's own wire answers without making httpx's Response first.
        self._wire = inner if isinstance(inner, AiohttpTransport) else None
        self._series = _Series(metrics)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        return (await self.exchange(request)).as_response()

    async def exchange(self, request: httpx.Request) -> WireAnswer:
        """The answer, its head read; the exchange ends when its body is closed."""
        context = current()
        exchange = _Exchange(request, context, self._series)
        try:
            if self._wire is not None:
                answer = await self._wire.exchange(request)
            else:
                answer = WireAnswer.of(await self._inner.handle_async_request(request))
        except BaseException:
            exchange.ended(NO_ANSWER)
            raise
        answer.body = _ObservedStream(answer.body, exchange, str(answer.status_code))
        return answer

    async def aclose(self) -> None:
        await self._inner.aclose()


class _Series:
    """Each provider's (and status's) metric series, each pair looked up once."""

    __slots__ = ("_pairs", "_requests", "_seconds")

    def __init__(self, metrics: Metrics) -> None:
        self._seconds = metrics.upstream_seconds
        self._requests = metrics.upstream_requests
        # Bounded as the label values are (providers and statuses; see metrics.py).
        self._pairs: dict[tuple[str, str], tuple[HistogramSeries, CounterSeries]] = {}

    def observe(self, provider: str, status: str, seconds: float) -> None:
        pair = self._pairs.get((provider, status))
        if pair is None:
            pair = self._seconds.labels(provider), self._requests.labels(provider, status)
            self._pairs[provider, status] = pair
        pair[0].observe(seconds)
        pair[1].inc()


class _Exchange:
    __slots__ = ("_context", "_done", "_provider", "_request", "_series", "_started")

    def __init__(
        self, request: httpx.Request, context: RequestContext | None, series: _Series
    ) -> None:
        self._request = request
        self._context = context
        self._series = series
        peer = request.extensions.get(PEER_EXTENSION)
        provider = context.provider if context is not None else ""
        self._provider = str(peer or provider or "none")
        self._done = False
        self._started = time.perf_counter()
        if context is not None:
            context.exchange_started()

    def ended(self, status: str) -> None:
        if self._done:
            return
        self._done = True
        seconds = time.perf_counter() - self._started
        if self._context is not None:
            self._context.exchange_ended()
        self._series.observe(self._provider, status, seconds)
        if logger.isEnabledFor(logging.INFO):
            url = log_url(self._request.url)
            logger.info(
                "upstream %s %s %s -> %s in %.0f ms",
                self._provider,
                self._request.method,
                url,
                status,
                seconds * 1000,
                extra={
                    EVENT: {
                        "event": "upstream",
                        "provider": self._provider,
                        "method": self._request.method,
                        "url": url,
                        "status": status,
                        "duration_ms": round(seconds * 1000, 3),
                    }
                },
            )


class _ObservedStream(WholeBody):
    """The answer's body as it is; the exchange ends (with ``status``) when it is closed."""

    def __init__(self, inner: httpx.AsyncByteStream, exchange: _Exchange, status: str) -> None:
        self._inner = inner
        self._exchange = exchange
        self._status = status

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._inner.__aiter__()  # the chunks as they come, no layer in between

    async def read_pieces(self) -> list[bytes]:
        if isinstance(self._inner, WholeBody):
            return await self._inner.read_pieces()
        return await super().read_pieces()

    async def aclose(self) -> None:
        try:
            await self._inner.aclose()
        finally:
            self._exchange.ended(self._status)
