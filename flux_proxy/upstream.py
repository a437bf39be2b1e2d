"""Talking to an upstream, the same way for every provider, built-in or plugin.

- :class:`Upstream`: one provider call's requests, with its key sent only to the
  provider's hosts (flux_proxy/hosts.py), every answer read with a size cap, and
  the key redacted from everything passed on.
- :func:`error_for_status` and :func:`validation_error`: an upstream's failure as
  the error the client should see, so the same trouble reads the same whoever the
  upstream is.
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import httpx
import orjson

from flux_proxy.answer_body import PiecewiseAnswer, WholeBody
from flux_proxy.deadline import Deadline, Deadlines
from flux_proxy.errors import (
    ContentPolicyViolation,
    GatewayError,
    InvalidRequest,
    RaisedAs,
    RateLimited,
    UpstreamError,
    UpstreamTimeout,
    redact,
)
from flux_proxy.hosts import KeyHosts
from flux_proxy.json_blobs import Pieces, loads_keeping
from flux_proxy.native_body import public_param
from flux_proxy.read_budget import ReadBudget, Reservation
from flux_proxy.request_builder import RequestBuilder
from flux_proxy.transport import WireAnswer

if TYPE_CHECKING:
    from flux_proxy.schema import ImageJob

# Longest upstream text quoted in an error, and longest error message passed on.
MAX_MESSAGE = 500
MAX_ERROR_MESSAGE = 1000

# Upstream error codes that mean "moderation refused this", whatever the model's
# generation calls it (dall-e-3 and gpt-image differ); the client sees OpenAI's
# ``content_policy_violation``, as it does from every plugin provider.
MODERATION_CODES: frozenset[str] = frozenset({"content_policy_violation", "moderation_blocked"})
# An upstream code passes on only when it looks like one: a code is matched on by
# client code, so free text (or anything echoing a key) never goes there.
CODE_PATTERN = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
# RFC 9110's IMF-fixdate, the one HTTP-date form a sender should produce.
HTTP_DATE = re.compile(
    r"(Mon|Tue|Wed|Thu|Fri|Sat|Sun), \d{2} "
    r"(Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec) \d{4} \d{2}:\d{2}:\d{2} GMT"
)


def upstream_message(response: httpx.Response, secrets: Sequence[str] = ()) -> str:
    """The human part of an upstream error body, whatever shape it has.

    Redacted first, cut to MAX_MESSAGE after: cut first, a key split at the cut
    would no longer match and its first half would pass on.
    """
    return clip(redact(_message_text(response), list(secrets)))


def clip(text: str, limit: int = MAX_MESSAGE) -> str:
    text = text.strip()
    return text if len(text) <= limit else text[: limit - 3].rstrip() + "..."


def _message_text(response: httpx.Response) -> str:
    try:
        body = response.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        return response.text
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return str(error["message"])
        for key in ("detail", "message", "error", "title"):
            value = body.get(key)
            if isinstance(value, str):
                return value
            if value is not None:
                return json.dumps(value)
    return json.dumps(body)


def forwardable_retry_after(value: str | None) -> str | None:
    """An upstream's ``Retry-After``, only when it is what the header may hold.

    A number of seconds or an HTTP date; anything else (free text, an echoed key)
    is not passed on to the client.
    """
    if value is None:
        return None
    value = value.strip()
    if (value.isdigit() and len(value) <= 10) or HTTP_DATE.fullmatch(value):
        return value
    return None


def error_for_status(
    response: httpx.Response, *, provider: str, secrets: Sequence[str]
) -> GatewayError:
    status = response.status_code
    detail = upstream_message(response, secrets)
    if status in (401, 403):
        return UpstreamError(
            f"The {provider} upstream rejected the gateway's credentials (HTTP {status}). "
            "Your own key was accepted; the gateway's operator must fix its upstream key.",
            code="upstream_auth_failed",
        )
    if status == 402:
        return UpstreamError(
            f"The {provider} upstream account is out of credit.",
            code="upstream_insufficient_credit",
        )
    if status == 429:
        headers = {}
        if retry_after := forwardable_retry_after(response.headers.get("retry-after")):
            headers["Retry-After"] = retry_after
        return RateLimited(
            f"The {provider} upstream is rate limiting requests: {detail}", headers=headers
        )
    if status in (400, 422):
        param = _openai_field(response, "param")
        code = _openai_field(response, "code")
        if code is not None and not CODE_PATTERN.fullmatch(code):
            code = None
        message = f"The {provider} upstream rejected the request: {detail}"
        if code in MODERATION_CODES:
            return ContentPolicyViolation(message, param=param)
        return InvalidRequest(message, param=param, code=code)
    if status in (408, 504):
        return UpstreamTimeout(f"The {provider} upstream timed out (HTTP {status}).")
    return UpstreamError(f"The {provider} upstream failed with HTTP {status}: {detail}")


def _openai_field(response: httpx.Response, name: str) -> str | None:
    """A string field of an OpenAI-shaped ``{"error": {...}}`` body, if there is one."""
    try:
        error = response.json().get("error")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return None
    value = error.get(name) if isinstance(error, dict) else None
    return value if isinstance(value, str) else None


def upstream_json(
    response: httpx.Response, *, provider: str, what: str, keep_base64: str | None = None
) -> Any:
    """The answer's JSON, or a 502 saying the upstream sent something else.

    Parsed by orjson, straight from the bytes: answers carry megabytes of base64. With
    ``keep_base64``, that member's values that are strict base64 stay the answer's
    bytes, checked, never parsed into a str (see flux_proxy/json_blobs.py); any
    other value of it is a str."""
    try:
        if keep_base64 is not None:
            # Cut from the pieces it was read in, where it is: the body is never joined.
            body: bytes | Pieces = (
                Pieces(response.pieces)
                if isinstance(response, PiecewiseAnswer)
                else response.content
            )
            return loads_keeping(body, keep_base64, base64=True)
        return orjson.loads(response.content)
    except (ValueError, UnicodeDecodeError):
        raise UpstreamError(
            f"The {provider} upstream answered the {what} with something other than JSON."
        ) from None


def upstream_transport_errors(provider: str) -> _TransportErrors:
    """Turn httpx's transport failures into 502/504 answers (``with ...:``)."""
    return _TransportErrors(provider)


class _TransportErrors(RaisedAs):
    """upstream_transport_errors' context manager, entered for every upstream call."""

    __slots__ = ("_provider",)
    chained = False  # the httpx error is not carried on: its text may hold the URL

    def __init__(self, provider: str) -> None:
        self._provider = provider

    def translate(self, error: BaseException) -> BaseException | None:
        if isinstance(error, httpx.TimeoutException):
            return UpstreamTimeout(f"The {self._provider} upstream did not answer in time.")
        if isinstance(error, httpx.HTTPError):
            return UpstreamError(
                f"The {self._provider} upstream could not be reached ({type(error).__name__})."
            )
        return None


# Sends a built request and answers with its head read, its body still streaming.
Send = Callable[[httpx.Request], Awaitable[WireAnswer]]


def client_send(http: httpx.AsyncClient) -> Send:
    """``http.send``, streamed: for a client that is not the gateway's own."""

    async def send(request: httpx.Request) -> WireAnswer:
        return WireAnswer.of(await http.send(request, stream=True))

    return send


async def send_capped(
    send: Send,
    request: httpx.Request,
    *,
    max_bytes: int,
    reads: ReadBudget | None = None,
    deadlines: Deadlines | None = None,
) -> httpx.Response:
    """Send ``request`` and read the answer, refusing (502) one larger than ``max_bytes``.

    The answer is read as it arrives and given up at the cap (or at once when its
    Content-Length says it is over), never held whole first, however large the
    upstream makes it. Transport failures are the caller's to map. With ``reads``, the
    body is read in its turn within that budget (flux_proxy/read_budget.py).

    The request's read timeout (the client's ``limits.upstream_timeout``) bounds the
    whole exchange, not only each read: an upstream trickling a byte a second would
    otherwise hold the request until its own deadline. Past it: ``httpx.ReadTimeout``.
    (One asyncio deadline, flux_proxy/deadline.py: an anyio cancel scope per exchange
    cost 5-6% of a url pass-through's CPU; the transport underneath is asyncio's anyway.)
    With ``deadlines``, its timer is the one the gateway's exchanges share.
    """
    timeouts = request.extensions.get("timeout", {})
    budget = timeouts.get("read")
    if budget is not None:
        # The deadline bounds every read as well: no per-read timer under it (aiohttp
        # re-arms one for each piece of the answer it receives).
        request.extensions["timeout"] = {**timeouts, "read": None}
    try:
        with Deadline(budget, deadlines):
            return await _read_capped(send, request, max_bytes, reads)
    except TimeoutError:
        raise httpx.ReadTimeout(
            f"The upstream exchange took longer than {budget:g} seconds.", request=request
        ) from None


async def _read_capped(
    send: Send, request: httpx.Request, max_bytes: int, reads: ReadBudget | None
) -> httpx.Response:
    answer = await send(request)
    held = None
    response: httpx.Response | None = None  # made only to decode (chunked, compressed)
    try:
        length, encoded = _framing(answer.raw_headers)
        if length is not None and length > max_bytes:
            raise AnswerTooLarge()
        # Only a compressed body decodes to more than it says.
        known = length if not encoded else None
        held = await reads.reserve(known) if reads is not None else None
        stream = answer.body
        if known is not None and isinstance(stream, WholeBody):
            # Its length known and under the cap, nothing to decode: one read, and no
            # httpx.Response made for the answer on the wire, only for what was read.
            pieces = await stream.read_pieces()
        else:
            response = answer.as_response()
            pieces = [await _capped_chunks(response, max_bytes, held if known is None else None)]
    finally:
        if held is not None:
            held.release()
        await answer.aclose()
    if known is not None:
        # Read as it came, nothing decoded: the answer's own headers are the copy's.
        return PiecewiseAnswer(
            answer.status_code, headers=answer.headers, pieces=pieces, request=request
        )
    assert response is not None
    # aiter_bytes already undid any content-encoding: the copy must not claim one.
    headers = [
        (k, v)
        for k, v in response.headers.multi_items()
        if k not in ("content-encoding", "content-length")
    ]
    return httpx.Response(response.status_code, headers=headers, content=pieces[0], request=request)


def _framing(raw_headers: Sequence[tuple[bytes, bytes]]) -> tuple[int | None, bool]:
    """The answer's Content-Length, where it gives one number, and whether it has a
    Content-Encoding: one look at the raw headers (httpx's lookup by name of a header
    that is absent costs a KeyError, 4% of a url pass-through's CPU)."""
    lengths: list[bytes] = []
    encoded = False
    for name, value in raw_headers:
        lowered = name.lower()
        if lowered == b"content-length":
            lengths.append(value)
        elif lowered == b"content-encoding":
            encoded = True
    if len(lengths) == 1 and lengths[0].isdigit():
        return int(lengths[0]), encoded
    return None, encoded


async def _capped_chunks(
    response: httpx.Response, max_bytes: int, growing: Reservation | None
) -> bytes:
    """The decoded body of an answer read chunk by chunk (chunked, or compressed: the
    cap counts what it decodes to), given up as soon as it passes ``max_bytes``;
    ``growing`` counts what an answer of unknown length reads."""
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in response.aiter_bytes():
            size += len(chunk)
            if size > max_bytes:
                raise AnswerTooLarge()
            chunks.append(chunk)
            if growing is not None:
                growing.grow(len(chunk))
    except BaseException:
        # A failed read's traceback holds this frame (a cancelled fan-out sibling's may
        # sit in a reference cycle until the collector runs): not the megabytes read.
        chunks.clear()
        raise
    return b"".join(chunks)


class AnswerTooLarge(UpstreamError):
    def __init__(self) -> None:
        super().__init__("The upstream's answer is larger than the gateway accepts.")


class Upstream:
    """One provider call's line to its upstream: the key, where it may go, how much to read.

    Every request goes through :meth:`request`: the provider's auth header is added,
    a URL the upstream handed back is checked first (the key goes only to the
    provider's hosts, and the gateway's private-address guard applies), the answer
    is read with a size cap, and transport failures become 502/504. :meth:`redact`
    is the one place a provider key is taken out of what is passed on.
    """

    def __init__(
        self,
        *,
        provider: str,
        http: httpx.AsyncClient,
        key: str | None,
        auth: Mapping[str, str],
        hosts: KeyHosts,
        guard: Callable[[str], Awaitable[None]],
        max_bytes: int,
        send: Send | None = None,
        reads: ReadBudget | None = None,
        build: RequestBuilder | None = None,
        deadlines: Deadlines | None = None,
    ) -> None:
        """``send`` takes the requests ``http`` builds (default: ``http.send``; the
        gateway's: ``Runtime.exchange``);
        ``build`` builds them (default: one for ``http``; the gateway keeps one per
        client); ``reads`` is the gateway's budget for answers being read
        (flux_proxy/read_budget.py); ``deadlines``, the timers its exchanges' deadlines
        share (flux_proxy/deadline.py)."""
        self.provider = provider
        self._send = send or client_send(http)
        self._build = build or RequestBuilder(http)
        self._secrets = [key] if key else []
        self._auth = dict(auth)
        self.hosts = hosts
        self._guard = guard
        self.max_bytes = max_bytes
        self._reads = reads
        self._deadlines = deadlines

    def __repr__(self) -> str:  # never the key, in a log line or a traceback's locals
        return f"Upstream({self.provider!r})"

    def redact(self, text: str, limit: int | None = MAX_MESSAGE) -> str:
        """``text`` without the key, then (with ``limit``) clipped to that length."""
        text = redact(text, self._secrets)
        return clip(text, limit) if limit is not None else text

    async def check_handed_back(self, url: str, what: str) -> None:
        """Refuse a URL from an upstream answer that must not get the key (502)."""
        self.hosts.check(url, what)
        await self._guard(url)

    async def request(
        self,
        method: str,
        url: str,
        *,
        handed_back: str | None = None,
        json: Any = None,
        params: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
        max_bytes: int | None = None,
    ) -> httpx.Response:
        """One capped exchange with the key. ``handed_back`` names a URL the upstream
        gave (``"polling URL"``): it is checked before anything is sent."""
        if handed_back is not None:
            await self.check_handed_back(url, handed_back)
        with upstream_transport_errors(self.provider):
            request = self._build(
                method,
                url,
                json=json,
                params=params,
                headers={**self._auth, **headers} if headers else self._auth,
                keep_url=handed_back is None,
            )
            return await send_capped(
                self._send,
                request,
                max_bytes=max_bytes if max_bytes is not None else self.max_bytes,
                reads=self._reads,
                deadlines=self._deadlines,
            )

    def json(self, response: httpx.Response, what: str, *, keep_base64: str | None = None) -> Any:
        return upstream_json(response, provider=self.provider, what=what, keep_base64=keep_base64)

    def json_object(self, response: httpx.Response, what: str) -> dict[str, Any]:
        payload = self.json(response, what)
        if not isinstance(payload, dict):
            raise UpstreamError(
                f"The {self.provider} upstream answered the {what} with something other than "
                "a JSON object."
            )
        return payload

    def error(
        self,
        response: httpx.Response,
        job: ImageJob | None = None,
        *,
        size_fields: frozenset[str] = frozenset(),
    ) -> GatewayError:
        """The client's error for a failed answer: a validation error naming the public
        parameter where the upstream points at a field, else the status's mapping."""
        if job is not None and response.status_code in (400, 422):
            invalid = validation_error(response, job, self, size_fields=size_fields)
            if invalid is not None:
                return invalid
        return error_for_status(response, provider=self.provider, secrets=self._secrets)

    def scrub(self, error: GatewayError) -> GatewayError:
        """``error`` as it may reach the client: no key in its message or headers."""
        error.message = self.redact(error.message, limit=MAX_ERROR_MESSAGE)
        error.args = (error.message,)
        retry_after = forwardable_retry_after(error.headers.pop("Retry-After", None))
        error.headers = {k: self.redact(v, limit=None) for k, v in error.headers.items()}
        if retry_after is not None:
            error.headers["Retry-After"] = retry_after
        return error


def validation_error(
    response: httpx.Response, job: ImageJob, upstream: Upstream, *, size_fields: frozenset[str]
) -> InvalidRequest | None:  # ContentPolicyViolation is an InvalidRequest
    """An upstream's "this field is invalid" as a 400 naming the client's parameter
    (or, where the item says ``content_policy_violation``, a moderation refusal).

    Reads FastAPI/pydantic's ``{"detail": [{"loc": ["body", field, ...], "msg"}]}``
    (BFL, fal) and Replicate's ``{"invalid_fields": [{"field": "input.x",
    "description"}]}``; None when the answer names no single field.
    """
    try:
        body = response.json()
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(body, dict):
        return None
    refused = _content_policy(body, upstream)
    if refused is not None:
        return refused
    found = _fastapi_field(body) or _replicate_field(body)
    if found is None:
        return None
    path, name, message = found
    param = public_param(job, name, size_fields=size_fields)
    sent = f" (sent as {path})" if path != param else ""
    text = upstream.redact(f"The {upstream.provider} upstream rejected '{param}'{sent}: {message}")
    return InvalidRequest(text, param=param)


def _content_policy(body: dict[str, Any], upstream: Upstream) -> ContentPolicyViolation | None:
    """A FastAPI-style detail item typed ``content_policy_violation`` (fal's moderation)."""
    detail = body.get("detail")
    for item in detail if isinstance(detail, list) else ():
        if isinstance(item, dict) and item.get("type") == "content_policy_violation":
            said = str(item.get("msg") or "content policy violation")
            return ContentPolicyViolation(
                upstream.redact(
                    f"The {upstream.provider} upstream's content checker refused "
                    f"the request: {said}"
                )
            )
    return None


def _fastapi_field(body: dict[str, Any]) -> tuple[str, str, str] | None:
    detail = body.get("detail")
    if not isinstance(detail, list) or not detail or not isinstance(detail[0], dict):
        return None
    first = detail[0]
    loc = first.get("loc")
    parts = [str(part) for part in loc if part != "body"] if isinstance(loc, list) else []
    names = [part for part in parts if not part.isdigit()]
    if not names:
        return None
    return ".".join(parts), names[0], str(first.get("msg") or "invalid value")


def _replicate_field(body: dict[str, Any]) -> tuple[str, str, str] | None:
    fields = body.get("invalid_fields")
    if not isinstance(fields, list) or not fields or not isinstance(fields[0], dict):
        return None
    path = str(fields[0].get("field", ""))
    name = path.removeprefix("input.").split(".")[0]
    if not name or name == "input":
        return None  # e.g. a missing required field: no single public parameter to name
    return path, name, str(fields[0].get("description") or "invalid value")
