"""httpx's API on aiohttp's connection pool: the transport of the gateway's one client.

Everything upstream goes through ``httpx.AsyncClient`` (the narrow seam the providers,
the fetcher and the forwarder use); only the wire underneath is aiohttp's, whose pool
and C parser cost a third less CPU per upstream call than httpcore + h11 here (see the
commit that chose it). The request goes out exactly as httpx built it: its URL as
encoded, its headers and nothing added, no cookie kept, no body decoded.
"""

from __future__ import annotations

import ssl
import sys
from collections.abc import AsyncIterator, Callable, Sequence

import aiohttp
import httpx
import yarl

from flux_proxy.addresses import ResolverFactory
from flux_proxy.answer_body import WholeBody
from flux_proxy.errors import RaisedAs
from flux_proxy.kept import Kept

# Headers aiohttp adds when a request has none: httpx sets its own, and a forwarded
# request carries only the client's.
_NOT_ADDED = ("Accept", "Accept-Encoding", "User-Agent", "Content-Type")
_CHUNK = 64 * 1024
_READ_AHEAD = 64 * 1024
# URLs and timeout sets kept made (a provider's few endpoints; others come and go).
_KEPT = 256
# Header pairs kept as text: a few per provider endpoint, and one per body length seen.
_KEPT_PAIRS = 1024


class _NoUrlCredentials(httpx.Auth):
    """The client's auth: none. Without one, httpx turns a URL's user:pass@ into a
    Basic Authorization header; the gateway's credentials are the headers it sets."""


NO_URL_CREDENTIALS = _NoUrlCredentials()


class AiohttpTransport(httpx.AsyncBaseTransport):
    """One aiohttp session, made on first use inside the running loop, closed with the
    client. Failures arrive as httpx's exceptions, so callers map them as before."""

    def __init__(
        self,
        *,
        max_connections: int,
        ssl_context: Callable[[], ssl.SSLContext],
        resolver: ResolverFactory | None = None,
        idle_seconds: float = 15.0,
    ) -> None:
        """``resolver`` makes the resolver every connection's host name goes through
        (inside the running loop; unset: aiohttp's default). ``idle_seconds``: a pooled
        connection idle longer is closed, never reused (aiohttp's default: 15 s)."""
        self._limit = max_connections
        self._idle_seconds = idle_seconds
        self._ssl_context = ssl_context
        self._resolver = resolver
        self._session: aiohttp.ClientSession | None = None
        self._urls: Kept[str, yarl.URL] = Kept(_KEPT)
        self._timeouts: Kept[tuple[float | None, ...], aiohttp.ClientTimeout] = Kept(_KEPT)
        self._pairs: Kept[tuple[bytes, bytes], tuple[str, str] | None] = Kept(_KEPT_PAIRS)

    def _open(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(
                limit=self._limit,
                keepalive_timeout=self._idle_seconds,
                ssl=self._ssl_context(),
                resolver=self._resolver() if self._resolver is not None else None,
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                # A gateway serves many clients: no upstream's cookie is kept or replayed.
                cookie_jar=aiohttp.DummyCookieJar(),
                auto_decompress=False,  # httpx undoes content-encoding itself
                skip_auto_headers=_NOT_ADDED,
                # A small read-ahead: an answer waiting its turn to be read (read_budget.py)
                # holds this much in memory, the rest in the kernel (default: 256 KiB).
                read_bufsize=_READ_AHEAD,
            )
        return self._session

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        return (await self.exchange(request)).as_response()

    async def exchange(self, request: httpx.Request) -> WireAnswer:
        """The answer to ``request``, its head read, its body not (see WireAnswer)."""
        timeout = request.extensions.get("timeout", {})
        try:
            body: bytes | httpx.AsyncByteStream | None = request.content or None
        except httpx.RequestNotRead:  # a streamed body (the forwarder's)
            body = request.stream  # type: ignore[assignment]
        with _HttpxErrors(request):
            answer = await self._open().request(
                request.method,
                self._url(request.url),
                headers=self._headers(request.headers),
                data=body,
                allow_redirects=False,
                timeout=self._timeout(
                    timeout.get("pool"), timeout.get("connect"), timeout.get("read")
                ),
            )
        return WireAnswer(
            answer.status,
            answer.raw_headers,
            _AnswerStream(answer, request),
            request,
            reason=answer.reason,
        )

    def _headers(self, headers: httpx.Headers) -> list[tuple[str, str]]:
        """:func:`_headers`, each raw (name, value) pair converted once: a provider's
        calls send the same few (all but the body's length), and decoding them anew
        cost 2% of a url pass-through's instructions."""
        kept = self._pairs
        text: list[tuple[str, str]] = []
        try:
            for pair in headers.raw:
                made = kept.get(pair)
                if made is None and pair not in kept:  # None kept: Transfer-Encoding
                    made = kept.keep(pair, _as_text(pair))
                if made is not None:
                    text.append(made)
        except UnicodeDecodeError:
            return _headers(headers)
        return text

    def _url(self, url: httpx.URL) -> yarl.URL:
        """``url`` byte for byte, as httpx encoded it, but with no userinfo: aiohttp would
        turn user:pass@ into an Authorization header, as httpx would (see
        NO_URL_CREDENTIALS). Made once per URL: providers call the same few."""
        text = str(url)
        made = self._urls.get(text)
        if made is None:
            made = self._urls.keep(text, yarl.URL(text, encoded=True).with_user(None))
        return made

    def _timeout(
        self, pool: float | None, connect: float | None, read: float | None
    ) -> aiohttp.ClientTimeout:
        """httpx's timeouts as aiohttp's, made once for each set of them."""
        key = (pool, connect, read)
        made = self._timeouts.get(key)
        if made is None:
            made = self._timeouts.keep(
                key,
                aiohttp.ClientTimeout(
                    total=None, connect=pool, sock_connect=connect, sock_read=read
                ),
            )
        return made

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()


def _headers(headers: httpx.Headers) -> list[tuple[str, str]]:
    """The request's headers for aiohttp: names lowercased, as httpx's ``multi_items``
    gives them, from the raw list (ASCII, as httpx encodes them, unless a forwarded
    client sent otherwise: then httpx's own decoding)."""
    try:
        return [pair for pair in map(_as_text, headers.raw) if pair is not None]
    except UnicodeDecodeError:
        return [(k, v) for k, v in headers.multi_items() if k != "transfer-encoding"]


def _as_text(pair: tuple[bytes, bytes]) -> tuple[str, str] | None:
    """One raw header as aiohttp takes it; None for Transfer-Encoding (aiohttp frames
    the body itself)."""
    name, value = pair
    lowered = name.lower()
    if lowered == b"transfer-encoding":
        return None
    return lowered.decode("ascii"), value.decode("ascii")


class WireAnswer:
    """An upstream's answer with its head read and its body not: what the gateway's own
    calls take from the wire. httpx's Response for it is made only when a caller asks
    for one (``as_response``): an answer read whole at once needs none.

    ``of`` holds an answer another transport made (a test's, say) as it is."""

    __slots__ = ("_reason", "_request", "_response", "body", "raw_headers", "status_code")

    def __init__(
        self,
        status_code: int,
        raw_headers: Sequence[tuple[bytes, bytes]],
        body: httpx.AsyncByteStream,
        request: httpx.Request | None,
        *,
        reason: str | None = None,
        response: httpx.Response | None = None,
    ) -> None:
        """``body`` may be replaced (by one that watches it) before ``as_response``."""
        self.status_code = status_code
        self.raw_headers = raw_headers
        self.body = body
        self._request = request
        self._reason = reason
        self._response = response

    @classmethod
    def of(cls, response: httpx.Response) -> WireAnswer:
        body = response.stream
        assert isinstance(body, httpx.AsyncByteStream)  # an async transport's answer
        return cls(response.status_code, response.headers.raw, body, None, response=response)

    def as_response(self) -> httpx.Response:
        """The answer as httpx's, its body (``body``) still to be read; made once."""
        response = self._response
        if response is None:
            extensions: dict[str, object] = {"http_version": b"HTTP/1.1"}
            if self._reason:
                extensions["reason_phrase"] = self._reason.encode("latin-1", "replace")
            response = self._response = httpx.Response(
                self.status_code,
                headers=list(self.raw_headers),
                stream=self.body,
                request=self._request,
                extensions=extensions,
            )
        else:
            response.stream = self.body
        return response

    @property
    def http_version(self) -> str:
        return self._response.http_version if self._response is not None else "HTTP/1.1"

    @property
    def reason_phrase(self) -> str:
        if self._response is not None:
            return self._response.reason_phrase
        return self._reason or httpx.codes.get_reason_phrase(self.status_code)

    @property
    def headers(self) -> httpx.Headers | Sequence[tuple[bytes, bytes]]:
        """The headers as httpx holds them where it made the answer, else as they came."""
        return self._response.headers if self._response is not None else self.raw_headers

    async def aclose(self) -> None:
        """Close the body: as httpx does where it made the answer (its state, its errors)."""
        if self._response is not None:
            await self.as_response().aclose()
        else:
            await self.body.aclose()


class _AnswerStream(WholeBody):
    def __init__(self, answer: aiohttp.ClientResponse, request: httpx.Request) -> None:
        self._answer = answer
        self._request = request

    async def __aiter__(self) -> AsyncIterator[bytes]:
        with _HttpxErrors(self._request):
            async for chunk in self._answer.content.iter_chunked(_CHUNK):
                yield chunk

    async def read_pieces(self) -> list[bytes]:
        # The chunks as the parser fed them, never joined here (aiohttp's read() joins
        # what is buffered at each wake-up, then all of it again). The parser stops at the
        # Content-Length; the answer goes back to the pool as its last byte arrives.
        content = self._answer.content
        # Its turn to be read has come (read_budget.py): no more pausing the socket at
        # every read-ahead's worth of it (as aiohttp's own read() does; 10% of a b64
        # answer's CPU at 64 KiB). What it holds stays within its Content-Length.
        widen = getattr(content, "set_read_chunk_size", None)  # not in every aiohttp
        if widen is not None:
            widen(sys.maxsize)
        blocks: list[bytes] = []
        try:
            with _HttpxErrors(self._request):
                while not content.at_eof():
                    block, _ = await content.readchunk()
                    blocks.append(block)
        except BaseException:
            blocks.clear()  # not held by the traceback (see upstream._capped_chunks)
            raise
        return blocks

    async def aclose(self) -> None:
        self._answer.release()  # back to the pool when read to the end, else closed


class _HttpxErrors(RaisedAs):
    """aiohttp's failures raised as httpx's, for every exchange and body read."""

    __slots__ = ("_request",)

    def __init__(self, request: httpx.Request) -> None:
        self._request = request

    def translate(self, error: BaseException) -> BaseException | None:
        return _httpx_error(error, self._request)


def _httpx_error(error: BaseException, request: httpx.Request) -> httpx.TransportError | None:
    """httpx's exception for one of aiohttp's (or a timeout's); None for anything else."""
    text = str(error)
    if isinstance(error, aiohttp.ConnectionTimeoutError):
        return httpx.ConnectTimeout(text, request=request)
    if isinstance(error, aiohttp.ServerTimeoutError | TimeoutError):
        return httpx.ReadTimeout(text, request=request)
    if isinstance(error, aiohttp.ClientConnectorError):
        return httpx.ConnectError(text, request=request)
    if isinstance(error, aiohttp.InvalidURL):
        return httpx.UnsupportedProtocol(text, request=request)
    if isinstance(error, aiohttp.ClientError):
        return httpx.ReadError(text, request=request)
    return None
