"""One image request from validated input to response: failover, deadline, rendering.

The middleware stack runs once per provider attempt. When an attempt fails in a
retryable way (the upstream is down, rate limited, or rejected the gateway's own
key) and the model lists another provider, that one serves the request; the
report says which provider answered and which failed before it. A provider whose
circuit breaker is open is skipped without a call (flux_proxy/breaker.py), and the
report says that too; when every one is skipped, the answer is a fast 503.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

import anyio
import orjson
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from flux_proxy import b64
from flux_proxy.admission import Demand
from flux_proxy.breaker import BreakerBoard, BreakerState, CircuitBreaker
from flux_proxy.config import Settings
from flux_proxy.deadline import Deadline, Deadlines
from flux_proxy.errors import (
    GatewayError,
    InternalError,
    InvalidRequest,
    UpstreamCredentialsMissing,
    UpstreamError,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from flux_proxy.imaging import FORMAT_OF_MEDIA_TYPE
from flux_proxy.peek import sniff_format
from flux_proxy.pipeline import Stack, derive
from flux_proxy.request_context import current
from flux_proxy.routing import ModelRoute
from flux_proxy.schema import (
    GeneratedImage,
    ImageJob,
    ImageRequest,
    ImageResult,
    Progress,
    ProgressSink,
    Report,
    Target,
)
from flux_proxy.sizes import SizePlanner

logger = logging.getLogger("flux_proxy")

REPORT_HEADER = "x-flux-proxy-params"
PROVIDER_HEADER = "x-flux-proxy-provider"
# ImagesResponse.output_format and the stream events' output_format admit only these,
# and the stream events' size only these (OpenAI spec).
SPEC_OUTPUT_FORMATS = frozenset({"png", "webp", "jpeg"})
SPEC_EVENT_SIZES = frozenset({"1024x1024", "1024x1536", "1536x1024"})


class Generator:
    def __init__(
        self,
        settings: Settings,
        stack: Stack,
        breakers: BreakerBoard,
        sizes: SizePlanner,
        deadlines: Deadlines | None = None,
    ) -> None:
        """``deadlines``: the timers the requests' deadlines share (flux_proxy/deadline.py)."""
        self._settings = settings
        self._deadlines = deadlines
        self._stack = stack
        self._breakers = breakers
        self._sizes = sizes

    def demand(self, request: ImageRequest, model: ModelRoute) -> Demand:
        """What ``request`` asks the gateway to make, for admission (flux_proxy/admission.py):
        its target size as the first provider would resolve it, ``n``, its format."""
        target = self._sizes.plan(
            size=request.size,
            aspect_ratio=request.aspect_ratio,
            resolution=request.resolution,
            extras=request.extras,
            capabilities=model.targets[0].capabilities,
        ).target
        fmt = request.target_format or self._settings.defaults.output_format
        return Demand(pixels=target.width * target.height, n=request.n, fmt=fmt)

    def check(self, request: ImageRequest, model: ModelRoute, public_url: str | None) -> None:
        """Reject bad input before a streaming response commits to 200."""
        job = self._job(request, model.targets[0], public_url)
        self._stack.check(job)
        # The provider's own refusals too (BFL's webhook_url, say): a 400, not an SSE error.
        job.target.provider.check(job)
        if request.stream and self._stack.honours("output_format"):
            target = request.target_format or self._settings.defaults.output_format
            if target not in SPEC_OUTPUT_FORMATS:
                # The completed event must name its format, from OpenAI's three.
                raise InvalidRequest(
                    f"output_format {target!r} cannot be streamed: OpenAI's "
                    "image_generation.completed event names png, webp or jpeg only. "
                    "Ask without stream for this format.",
                    param="output_format",
                )

    async def generate(
        self,
        request: ImageRequest,
        model: ModelRoute,
        public_url: str | None,
        progress: ProgressSink | None = None,
    ) -> ImageResult:
        """Run the stack against each of the model's providers until one answers."""
        limit = self._settings.limits.request_timeout
        # An asyncio deadline (flux_proxy/deadline.py), not an anyio cancel scope: the
        # same bound at a fraction of the cost (each anyio step asks sniffio which loop
        # runs). The request path is asyncio throughout (flux_proxy/disconnect.py
        # cancels the same way).
        try:
            with Deadline(limit, self._deadlines):
                return await self._first_success(request, model, public_url, progress)
        except TimeoutError:
            raise UpstreamTimeout(
                f"The request took longer than this gateway's limit of {limit:g} seconds."
            ) from None

    async def _first_success(
        self,
        request: ImageRequest,
        model: ModelRoute,
        public_url: str | None,
        progress: ProgressSink | None,
    ) -> ImageResult:
        failed: list[str] = []
        skipped: list[CircuitBreaker] = []  # circuits open: not called at all
        unset_keys: list[str] = []  # key variables found unset on the way
        last_error: GatewayError | None = None
        context = current()
        for attempt, target in enumerate(model.targets, start=1):
            breaker = self._breakers.for_target(target)
            ticket = breaker.acquire()
            if ticket is None:
                skipped.append(breaker)
                continue
            if context is not None:  # upstream exchanges from here on are this provider's
                context.provider = target.provider.name
            job = self._job(request, target, public_url)
            if progress is not None:
                job = derive(job, progress=progress)
            try:
                result = await self._stack(job)
            except GatewayError as error:
                if error.retryable and not isinstance(error, UpstreamCredentialsMissing):
                    breaker.failed(ticket, error.code or str(error.status_code))
                else:  # refused input, or never sent: nothing said of the upstream's health
                    breaker.released(ticket)
                if isinstance(error, UpstreamCredentialsMissing):
                    unset_keys.extend(error.variables)
                if not error.retryable:
                    raise
                if attempt < len(model.targets):
                    logger.warning(
                        "provider %s failed for %s (%s); trying the next one",
                        target.provider.name,
                        model.name,
                        error.code or error.status_code,
                    )
                failed.append(f"{target.provider.name} ({error.code or error.status_code})")
                # Kept for the end without its traceback, whose frames may hold a failed
                # answer's bytes while the next provider works.
                last_error = error.with_traceback(None)
                continue
            except BaseException:  # cancelled: the client left, or the deadline passed
                breaker.released(ticket)
                raise
            breaker.succeeded(ticket)
            detail = f"served by provider {target.provider.name} as {target.upstream_model}"
            if failed:
                detail += " after " + ", ".join(failed) + " failed"
            if skipped:
                detail += "; " + ", ".join(map(_skip_note, skipped))
            result.report.record("model", "converted", detail)
            result.report.fill(request.null_fields, "ignored", "null: the default applies")
            if "stream" in request.model_fields_set:
                if request.stream:
                    result.report.record(
                        "stream", "emulated", "gateway sends progress, then the images, as events"
                    )
                else:
                    result.report.record("stream", "passthrough", "one JSON response")
            return result
        if isinstance(last_error, UpstreamCredentialsMissing):
            # Not just the last provider's: the operator has to set them all.
            raise UpstreamCredentialsMissing(unset_keys)
        if last_error is not None:
            raise last_error
        raise _all_skipped(model, skipped)

    @staticmethod
    def _job(request: ImageRequest, target: Target, public_url: str | None) -> ImageJob:
        return ImageJob(
            request=request,
            target=target,
            report=Report(),
            public_url=public_url,
            n=request.n,
            seed=request.seed,
            output_compression=request.output_compression,
            fields=request.extras,
        )


def _skip_note(breaker: CircuitBreaker) -> str:
    """How the report says a provider was skipped by its circuit breaker."""
    name = breaker.upstream.provider
    if breaker.state is BreakerState.OPEN:
        return f"{name} skipped (circuit open, probed again in {math.ceil(breaker.retry_in())} s)"
    return f"{name} skipped (circuit half-open, its trial request is running)"


def _all_skipped(model: ModelRoute, skipped: list[CircuitBreaker]) -> UpstreamUnavailable:
    wait = max(1, math.ceil(min(breaker.retry_in() for breaker in skipped)))
    names = ", ".join(f"{b.upstream.provider} ({b.last_failure})" for b in skipped)
    return UpstreamUnavailable(
        f"Every provider of the model {model.name!r} is failing and skipped for now: {names}. "
        f"Retry in {wait} s.",
        headers={"Retry-After": str(wait)},
    )


def render_json(
    request: ImageRequest, result: ImageResult, sent: list[str], settings: Settings
) -> Response:
    wanted = request.response_format or settings.defaults.response_format
    head: dict[str, Any] = {"created": int(time.time())}
    if result.output_format in SPEC_OUTPUT_FORMATS:
        head["output_format"] = result.output_format
    body = JSONPieces()
    body.add(_json(head)[:-1] + b',"data":[')
    for index, image in enumerate(result.images):
        if index:
            body.add(b",")
        extra = {"revised_prompt": image.revised_prompt} if image.revised_prompt else {}
        if wanted == "url":
            if image.url is None:
                raise InternalError("An image reached the response without a URL.")
            body.add(_json({"url": image.url, **extra}))
        else:
            # base64 needs no JSON escaping: spliced in as it is, not scanned or copied.
            body.add(b'{"b64_json":"')
            body.splice(_b64_bytes(image))
            body.add(b'",' + _json(extra)[1:] if extra else b'"}')
    body.add(b"]}")
    return body.response(report_headers(result, sent))


class JSONPieces:
    """A JSON body assembled from small pieces and large ones (base64) kept apart."""

    def __init__(self) -> None:
        self._pieces: list[bytes] = []
        self._small = bytearray()

    def add(self, piece: bytes) -> None:
        self._small += piece

    def splice(self, large: bytes) -> None:
        self._flush()
        self._pieces.append(large)

    def response(self, headers: Mapping[str, str]) -> PiecesResponse:
        self._flush()
        return PiecesResponse(self._pieces, headers)

    def _flush(self) -> None:
        if self._small:
            self._pieces.append(bytes(self._small))
            self._small.clear()


_JSON_CONTENT_TYPE = (b"content-type", b"application/json")


class PiecesResponse(Response):
    """A 200 JSON response written piece by piece: a megabyte of the upstream's base64
    goes to the socket as the bytes it arrived in, never copied into one body first."""

    media_type = "application/json"

    def __init__(self, pieces: list[bytes], headers: Mapping[str, str]) -> None:
        self._pieces = pieces
        self.status_code = 200
        self.background = None
        # Not Response.init_headers: it would read (so join) the body for its length.
        # ``headers`` are the report's (lower-case names, neither of these two).
        self.raw_headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]
        self.raw_headers += (
            (b"content-length", b"%d" % sum(map(len, pieces))),
            _JSON_CONTENT_TYPE,
        )

    @property
    def body(self) -> bytes:
        """The whole body in one piece (tests and host middlewares that read it)."""
        return b"".join(self._pieces)

    @body.setter
    def body(self, value: bytes) -> None:
        self._pieces = [value]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        del scope, receive
        await send(
            {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
        )
        last = len(self._pieces) - 1
        for index, piece in enumerate(self._pieces):
            await send({"type": "http.response.body", "body": piece, "more_body": index < last})


def report_headers(result: ImageResult, sent: list[str]) -> dict[str, str]:
    result.report.fill(sent, "ignored", "not used by this model's provider")
    return {
        REPORT_HEADER: result.report.header_value(sent),
        PROVIDER_HEADER: result.provider,
    }


def render_stream(
    generate: Callable[[ProgressSink], Awaitable[ImageResult]],
    sent: list[str],
    on_close: Callable[[], None],
) -> StreamingResponse:
    """OpenAI's image-generation server-sent events.

    Progress from polling providers comes as ``flux_proxy.progress`` events (the
    official SDK's stream reader passes unknown event types through), previews as
    ``image_generation.partial_image``, each finished image as
    ``image_generation.completed``, and last a ``flux_proxy.report`` event with the
    normalisation report. A failure is an ``error`` event in OpenAI's error shape.
    """
    sender, receiver = anyio.create_memory_object_stream[bytes](64)

    async def on_progress(progress: Progress) -> None:
        await sender.send(_sse(progress_event(progress)))

    async def produce() -> None:
        async with sender:
            try:
                result = await generate(on_progress)
                for image in result.images:
                    for piece in completed_pieces(image, result):
                        await sender.send(piece)
                headers = report_headers(result, sent)
                report = json.loads(headers[REPORT_HEADER])
                await sender.send(
                    _sse(
                        {"type": "flux_proxy.report", "provider": result.provider, "params": report}
                    )
                )
            except GatewayError as error:
                await sender.send(_sse(error.body(), event="error"))
            except Exception:
                logger.exception("unexpected failure while streaming")
                await sender.send(
                    _sse(InternalError("The gateway failed unexpectedly.").body(), event="error")
                )

    async def events() -> AsyncIterator[bytes]:
        async with anyio.create_task_group() as group:
            group.start_soon(produce)
            async with receiver:
                async for chunk in receiver:
                    yield chunk

    return ClosingStream(
        events(),
        on_close,
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache"},
    )


class ClosingStream(StreamingResponse):
    """A stream that calls ``on_close`` once it has been sent, or given up: the work
    behind it (its admission ticket, say) lasts as long as the stream does."""

    def __init__(
        self,
        content: AsyncIterator[bytes],
        on_close: Callable[[], None],
        *,
        media_type: str,
        headers: Mapping[str, str],
    ) -> None:
        super().__init__(content, media_type=media_type, headers=headers)
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


def progress_event(progress: Progress) -> dict[str, Any]:
    preview_format = sniff_format(progress.preview) if progress.preview is not None else None
    if progress.preview is not None and preview_format in SPEC_OUTPUT_FORMATS:
        return {
            "type": "image_generation.partial_image",
            "b64_json": b64.encode(progress.preview).decode("ascii"),
            "created_at": int(time.time()),
            "size": "auto",
            "quality": "auto",
            "background": "auto",
            "output_format": preview_format,
            "partial_image_index": 0,
        }
    # No preview, or one in a format the partial_image event cannot name.
    return {
        "type": "flux_proxy.progress",
        "provider": progress.provider,
        "status": progress.status,
        "queue_position": progress.queue_position,
        "progress": progress.fraction,
    }


def completed_pieces(image: GeneratedImage, result: ImageResult) -> list[bytes]:
    """The ``image_generation.completed`` event, as the text around the image's base64
    and the base64 itself, which goes to the client as it is: never copied into the
    event (it used to be three times: quoted, dumped, framed; 1.4 MB each at 1 MP)."""
    event = _sse(completed_event(image, result))
    # base64 needs no JSON escaping; the event's JSON object ends in its last 3 bytes.
    return [event[: -len(b"}\n\n")] + b',"b64_json":"', _b64_bytes(image), b'"}\n\n']


def completed_event(image: GeneratedImage, result: ImageResult) -> dict[str, Any]:
    """OpenAI's ``ImageGenCompletedEvent`` but its ``b64_json`` (see ``completed_pieces``):
    every value within the spec's enums.

    The size is named only when it is one of OpenAI's; otherwise ``auto`` (the
    image itself says its size). A hosted image's link rides along as ``url``.
    """
    size = f"{image.width}x{image.height}"
    fmt = FORMAT_OF_MEDIA_TYPE.get(image.media_type or "") or result.output_format or "png"
    if fmt not in SPEC_OUTPUT_FORMATS:  # Generator.check refuses what it can foresee
        raise UpstreamError(
            f"The provider made a {fmt} image, which OpenAI's stream events cannot name."
        )
    event: dict[str, Any] = {
        "type": "image_generation.completed",
        "created_at": int(time.time()),
        "size": size if size in SPEC_EVENT_SIZES else "auto",
        "quality": "auto",
        "background": "auto",
        "output_format": fmt,
        "usage": {
            "input_tokens": 0,
            "output_tokens": 0,
            "total_tokens": 0,
            "input_tokens_details": {"image_tokens": 0, "text_tokens": 0},
        },
    }
    if image.url is not None:
        event["url"] = image.url
    return event


def _b64_bytes(image: GeneratedImage) -> bytes:
    """The image's base64 text: the upstream's own where it is unchanged."""
    text = image.checked_b64()
    if text is not None:
        return text
    if image.data is None:
        raise InternalError("An image reached the response without its bytes.")
    return b64.encode(image.data)


def _json(value: dict[str, Any]) -> bytes:
    return orjson.dumps(value)


def _sse(payload: dict[str, Any], event: str | None = None) -> bytes:
    name = event or str(payload.get("type", "message"))
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(payload) + b"\n\n"
