"""The sidecar's transparent forwarder: everything that is not an image route.

In standalone mode a client points its whole ``base_url`` at the gateway; chat,
embeddings and the rest must then reach the real API as if the gateway were not
there. So the request goes on unchanged (method, raw path, query, headers, body)
and the answer comes back unchanged (status, headers, body), both streamed, with
only the hop-by-hop headers of RFC 9110 section 7.6.1 dropped, since those describe one
connection and the gateway holds two. Nothing is buffered: a multi-megabyte
upload or a server-sent-events stream passes through chunk by chunk.

Only a failure to reach the upstream at all is the gateway's own answer (502, or
504 for a timeout) in OpenAI's error format. The upstream key never appears in
an answer or a log line: messages name the failure's type, never its request.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable
from urllib.parse import quote

import httpx
from starlette.requests import ClientDisconnect
from starlette.types import Message, Receive, Scope, Send

from flux_proxy.config import ForwardSettings
from flux_proxy.disconnect import unless_disconnected
from flux_proxy.errors import GatewayError, InvalidRequest, UpstreamError, UpstreamTimeout
from flux_proxy.logs import log_url

logger = logging.getLogger("flux_proxy")

# RFC 9110 section 7.6.1, plus Host: httpx sets the upstream's own from the URL.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)

RawHeaders = list[tuple[bytes, bytes]]


class Forwarder:
    def __init__(
        self,
        http: Callable[[], httpx.AsyncClient],
        settings: ForwardSettings,
        api_key: str | None,
        *,
        forward_authorization: bool = True,
    ) -> None:
        """``forward_authorization=False`` drops the client's Authorization when no
        ``api_key`` replaces it: the gateway checked it as one of its own client keys,
        and those must not be handed to a third party."""
        if settings.base_url is None:
            raise ValueError("Forwarder needs forward.base_url")
        self._http = http
        self._base_url = settings.base_url.rstrip("/")
        # For log lines: never the userinfo or query a base_url might carry.
        self._origin = log_url(self._base_url)
        self._api_key = api_key or None
        self._forward_authorization = forward_authorization
        if settings.api_key_env and self._api_key is None:
            logger.warning(
                "forward.api_key_env names %s, which is unset or empty: forwarded "
                "requests go to %s without the gateway's upstream key",
                settings.api_key_env,
                self._origin,
            )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        method: str = scope["method"]
        path = _raw_path(scope)
        try:
            request = self._build(scope, receive)
            # The shared client is never asked to merge in its defaults or its cookie
            # jar (build_request would): forwarded requests carry only the client's
            # own headers, and cookies one client's upstream set never reach another.
            response = await self._http().send(request, stream=True, follow_redirects=False)
        except ClientDisconnect:
            logger.info("%s %s: client disconnected while sending its body", method, path)
            return
        except httpx.TimeoutException:
            error: GatewayError = UpstreamTimeout("The upstream API did not answer in time.")
            await self._fail(error, method, path, "timed out", started, send)
            return
        except httpx.HTTPError as exc:
            error = UpstreamError(f"The upstream API could not be reached ({type(exc).__name__}).")
            await self._fail(error, method, path, type(exc).__name__, started, send)
            return
        except httpx.InvalidURL:
            error = InvalidRequest("This request's URL cannot be forwarded.")
            await self._fail(error, method, path, "refused: invalid URL", started, send)
            return
        try:
            outcome = await self._relay(response, receive, send)
        finally:
            await response.aclose()
        log = logger.info if outcome == "forwarded" else logger.warning
        log(
            "%s %s -> %d %s (upstream %s) in %.0f ms",
            method,
            path,
            response.status_code,
            outcome,
            self._origin,
            (time.perf_counter() - started) * 1000,
        )

    async def _relay(self, response: httpx.Response, receive: Receive, send: Send) -> str:
        """Stream ``response`` to the client; returns how that ended, for the log."""
        # The server's send() silently discards bytes once the client is gone; without
        # this an abandoned event stream would keep the upstream running to the end.
        outcome = await unless_disconnected(receive, lambda: self._copy(response, send))
        return outcome or "abandoned by the client"

    async def _copy(self, response: httpx.Response, send: Send) -> str:
        await send(
            {
                "type": "http.response.start",
                "status": response.status_code,
                "headers": _end_to_end(response.headers.raw),
            }
        )
        try:
            # Raw bytes: the body stays exactly as the upstream encoded it (gzip, SSE, ...).
            async for chunk in response.aiter_raw():
                if chunk:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
        except httpx.HTTPError as exc:
            # The status line is already out: returning without finishing the body makes
            # the server drop the connection, so the client sees a cut, not a short success.
            return f"cut off: upstream failed mid-response ({type(exc).__name__})"
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        return "forwarded"

    def _build(self, scope: Scope, receive: Receive) -> httpx.Request:
        target = _raw_path(scope)
        # The target is appended to base_url: one not starting with "/" ("1/x",
        # "@evil:80/x", ".evil.com/x") would change the host or port, and the
        # operator's key would go wherever the client pointed it.
        if not target.startswith("/"):
            raise httpx.InvalidURL("request target is not an absolute path")
        url = self._base_url + target
        query: bytes = scope.get("query_string", b"")
        if query:
            url += "?" + query.decode("latin-1")
        if httpx.URL(url).netloc != httpx.URL(self._base_url).netloc:
            raise httpx.InvalidURL("request target changes the upstream host")
        headers = _end_to_end(scope["headers"], drop=(b"host",))
        if self._api_key is not None:
            headers = [(k, v) for k, v in headers if k != b"authorization"]
            headers.append((b"authorization", b"Bearer " + self._api_key.encode("latin-1")))
        elif not self._forward_authorization:
            headers = [(k, v) for k, v in headers if k != b"authorization"]
        names = {name for name, _ in headers}
        # No length and no chunking means no body (a plain GET): sending an empty chunked
        # body instead would add a Transfer-Encoding the client never asked for.
        has_body = b"content-length" in names or _is_chunked(scope["headers"])
        return httpx.Request(
            scope["method"],
            url,
            headers=headers,
            content=_body(receive) if has_body else None,
            # What build_request would have set: the client's configured timeouts.
            extensions={"timeout": self._http().timeout.as_dict()},
        )

    async def _fail(
        self,
        error: GatewayError,
        method: str,
        path: str,
        reason: str,
        started: float,
        send: Send,
    ) -> None:
        logger.warning(
            "%s %s -> %d: upstream %s %s after %.0f ms",
            method,
            path,
            error.status_code,
            self._origin,
            reason,
            (time.perf_counter() - started) * 1000,
        )
        body = error.body_bytes()
        await send(
            {
                "type": "http.response.start",
                "status": error.status_code,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode("ascii")),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body, "more_body": False})


def _raw_path(scope: Scope) -> str:
    """The path as the client sent it, percent-encoding included."""
    raw: bytes | None = scope.get("raw_path")
    if raw:
        return raw.decode("latin-1")
    path: str = scope["path"]
    return quote(path, safe="/:@!$&'()*+,;=-._~%")


def _end_to_end(headers: RawHeaders, drop: tuple[bytes, ...] = ()) -> RawHeaders:
    """``headers`` without the hop-by-hop ones, including any that Connection names."""
    named = {
        token.strip().lower()
        for name, value in headers
        if name.lower() == b"connection"
        for token in value.split(b",")
    }
    excluded = HOP_BY_HOP | named | set(drop)
    return [(name.lower(), value) for name, value in headers if name.lower() not in excluded]


def _is_chunked(headers: RawHeaders) -> bool:
    return any(
        name.lower() == b"transfer-encoding" and b"chunked" in value.lower()
        for name, value in headers
    )


async def _body(receive: Receive) -> AsyncIterator[bytes]:
    while True:
        message: Message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect
        chunk: bytes = message.get("body", b"")
        if chunk:
            yield chunk
        if not message.get("more_body", False):
            return
