"""fal.ai's FLUX 1.1 [pro] models behind flux-proxy.

Two ways to call fal, chosen by the model's ``options.mode``:

- ``queue`` (default): ``POST {queue host}/{model}`` returns a ticket with
  ``status_url``, ``response_url`` and ``cancel_url``. The provider polls the
  status URL *as given* (fal builds it from the owner/app only, without the
  model's ``/v1.1`` sub-path), fetches the output from ``response_url`` once the
  status is ``COMPLETED``, and calls ``cancel_url`` if the request is abandoned.
- ``sync``: ``POST {sync host}/{model}`` answers with the output itself. Nothing
  can be cancelled and nothing is retried by fal.

``base_url`` in the model's config replaces the host of the configured mode
(``https://queue.fal.run`` or ``https://fal.run``); the emulator serves the queue
API at its root and the sync API under ``/sync``.

Model ``options`` (all optional):

- ``mode``: ``"queue"`` or ``"sync"``.
- ``poll_timeout``: seconds to wait for a queued request before giving up with
  504 and cancelling it upstream (default: only the request's own deadline).
- ``poll_interval`` / ``poll_max_interval``: first and longest wait between
  status polls, in seconds (default 0.5 / 5). fal's ``Retry-After`` wins.
- ``logs``: ask for the run's log lines when polling (``?logs=1``) and log them
  at debug level (default false).
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx

from flux_proxy.capabilities import Capabilities, SizeSupport
from flux_proxy.config import ProviderConfig
from flux_proxy.errors import (
    ContentPolicyViolation,
    GatewayError,
    InvalidRequest,
    UpstreamError,
    UpstreamTimeout,
    redact,
)
from flux_proxy.fields import SIZE_PARAMS, NativeBody, public_param
from flux_proxy.hosts import KeyHosts
from flux_proxy.polling import PollingOptions, cancel_upstream_on_exit
from flux_proxy.providers.base import provider_options
from flux_proxy.runtime import Runtime
from flux_proxy.schema import GeneratedImage, ImageJob, Progress
from flux_proxy.upstream import error_for_status, upstream_json, upstream_transport_errors

logger = logging.getLogger("flux_proxy.fal")

KEY_ENV = "FAL_KEY"
DEFAULT_MODEL = "fal-ai/flux-pro/v1.1"
DEFAULT_HOSTS: dict[str, str] = {"queue": "https://queue.fal.run", "sync": "https://fal.run"}
# fal's own API hosts (queue.fal.run, fal.run, the backup queue.falrun.com): the only
# ones, with the configured base_url and the trusted_hosts option, that get the key when
# a queue ticket names them. Result files (fal.media) are downloaded without it.
KEY_HOSTS = ("fal.run", "*.fal.run", "falrun.com", "*.falrun.com")

# fal's named image sizes (fal toolkit); a size equal to one is sent by name.
IMAGE_SIZE_PRESETS: dict[tuple[int, int], str] = {
    (1024, 1024): "square_hd",
    (512, 512): "square",
    (768, 1024): "portrait_4_3",
    (576, 1024): "portrait_16_9",
    (1024, 768): "landscape_4_3",
    (1024, 576): "landscape_16_9",
}

# FLUX 1.1 [pro] ultra takes only an aspect ratio and makes about 4 megapixels.
# The pixel size per ratio is what BFL's ultra produces as far as known (UNCERTAIN);
# the gateway resizes whatever comes back to the exact size asked for anyway.
ULTRA_SIZES: dict[tuple[int, int], str] = {
    (3136, 1344): "21:9",
    (2752, 1536): "16:9",
    (2368, 1792): "4:3",
    (2496, 1664): "3:2",
    (2048, 2048): "1:1",
    (1664, 2496): "2:3",
    (1792, 2368): "3:4",
    (1536, 2752): "9:16",
    (1344, 3136): "9:21",
}

# Public field -> fal field, type and range. Applied to the client's extra fields by
# the passthrough layer and to n by NativeBody.
COMMON_FIELDS: dict[str, Any] = {
    "n": {"name": "num_images"},
    # A string enum "1".."6" at fal (an integer at BFL and Replicate).
    "safety_tolerance": {"type": "string", "minimum": 1, "maximum": 6},
    "enhance_prompt": {"type": "boolean"},
    # BFL's name for the same switch.
    "prompt_upsampling": {"name": "enhance_prompt", "type": "boolean"},
    "sync_mode": {"type": "boolean"},
    "enable_safety_checker": {"type": "boolean"},
}


@dataclass(frozen=True)
class FalModel:
    """What one fal model accepts, as data."""

    description: str
    capabilities: Capabilities
    # The body field carrying the size, and the names fal has for sizes.
    size_field: Literal["image_size", "aspect_ratio"]
    size_names: Mapping[tuple[int, int], str]
    # Whether a size without a name may be sent as {"width", "height"}.
    custom_sizes: bool


MODELS: dict[str, FalModel] = {
    "fal-ai/flux-pro/v1.1": FalModel(
        description="FLUX 1.1 [pro] on fal.ai",
        capabilities=Capabilities(
            # fal accepts custom sizes up to 14142; whether it enforces FLUX's own
            # 256-1440 / multiple-of-32 rule is unknown, so only sizes FLUX accepts are asked for.
            sizes=SizeSupport(min_side=256, max_side=1440, multiple_of=32),
            max_images_per_call=4,
            output_formats=("jpeg", "png"),
            fields=COMMON_FIELDS,
        ),
        size_field="image_size",
        size_names=IMAGE_SIZE_PRESETS,
        custom_sizes=True,
    ),
    "fal-ai/flux-pro/v1.1-ultra": FalModel(
        description="FLUX 1.1 [pro] ultra on fal.ai",
        capabilities=Capabilities(
            sizes=SizeSupport(presets=tuple(ULTRA_SIZES)),
            # Ultra's ratios at the 1K tier (half of each side), so "2K" lands on its real size.
            ratios={ratio: (w // 2, h // 2) for (w, h), ratio in ULTRA_SIZES.items()},
            default_size=(2048, 2048),
            max_images_per_call=4,
            output_formats=("jpeg", "png"),
            fields={
                **COMMON_FIELDS,
                "raw": {"type": "boolean"},
                "image_prompt_strength": {"type": "number", "minimum": 0, "maximum": 1},
            },
        ),
        size_field="aspect_ratio",
        size_names=ULTRA_SIZES,
        custom_sizes=False,
    ),
}

# Body fields the provider fills from public parameters, and from which.
OWN_FIELD_SOURCES: dict[str, str] = {
    "prompt": "prompt",
    "image_size": "size",
    "aspect_ratio": "size",
    "num_images": "n",
    "seed": "seed",
    "output_format": "output_format",
}

# Statuses of fal's queue, in fal's spelling.
WAITING = frozenset({"IN_QUEUE", "IN_PROGRESS"})
COMPLETED = "COMPLETED"

# Error types in a fal ``detail`` list that are fal's fault, not the request's.
UPSTREAM_FAULTS: dict[str, type[UpstreamError]] = {
    "internal_server_error": UpstreamError,
    "downstream_service_error": UpstreamError,
    "downstream_service_unavailable": UpstreamError,
    "generation_timeout": UpstreamTimeout,
}

# Poll answers worth waiting out rather than failing on (fal's own clients retry these).
TRANSIENT_POLL_STATUSES = frozenset({429, 502, 503})
MAX_TRANSIENT_POLLS = 5


class FalOptions(PollingOptions):
    mode: Literal["queue", "sync"] = "queue"
    logs: bool = False


def model_for(config: ProviderConfig) -> FalModel:
    # Other fal model ids are assumed to take FLUX 1.1 [pro]'s input; capabilities
    # can be overridden in config where they differ.
    return MODELS.get(config.upstream_model or DEFAULT_MODEL, MODELS[DEFAULT_MODEL])


def options_for(config: ProviderConfig) -> FalOptions:
    return provider_options(FalOptions, config)


@dataclass
class _Call:
    """One upstream call's context: what error mapping and reporting need."""

    job: ImageJob
    model: FalModel
    options: FalOptions
    key: str = field(repr=False)  # never in a repr, a log line or a traceback's locals dump
    hosts: KeyHosts
    headers: dict[str, str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.headers = {"Authorization": f"Key {self.key}"}


class FalProvider:
    name = "fal"
    default_model = DEFAULT_MODEL

    def __init__(self, runtime: Runtime) -> None:
        self._runtime = runtime

    def capabilities(self, model: ProviderConfig) -> Capabilities:
        options_for(model)  # a bad option fails at startup, not on the first request
        return model_for(model).capabilities

    def description(self, model: ProviderConfig) -> str:
        model_id = model.upstream_model or DEFAULT_MODEL
        return f"{model_for(model).description} ({model_id}, {options_for(model).mode} API)"

    async def generate(self, job: ImageJob) -> list[GeneratedImage]:
        config = job.route.config
        key_env = config.api_key_env or KEY_ENV
        key = self._runtime.upstream_key(key_env)
        options = options_for(config)
        model_id = config.upstream_model or DEFAULT_MODEL
        base = (config.base_url or DEFAULT_HOSTS[options.mode]).rstrip("/")
        hosts = KeyHosts(self.name, (*KEY_HOSTS, *options.trusted_hosts), base)
        call = _Call(job, model_for(config), options, key, hosts)
        body = self._body(call)
        if options.mode == "sync":
            output = await self._run_sync(call, f"{base}/{model_id}", body)
        else:
            output = await self._run_queued(call, f"{base}/{model_id}", body)
        return self._images(call, output)

    # --- request body -------------------------------------------------------------

    def _body(self, call: _Call) -> dict[str, Any]:
        job = call.job
        native = NativeBody(job)
        native.put("prompt", job.request.prompt)
        self._put_size(call, native)
        if "n" in job.request.model_fields_set:
            native.put("n", job.n)
        else:
            native.body["num_images"] = job.n  # fal's default is 1 too; sent to be explicit
        if job.seed is not None:
            native.put("seed", job.seed)
        if job.output_format is not None:
            native.put("output_format", job.output_format)
        own = dict(native.body)
        native.put_fields()
        for name, value in job.fields.items():
            # A client sending fal's own name (image_size, num_images, ...) does not beat the
            # public parameter the gateway already turned into that field.
            if name in own and own[name] != value:
                job.report.record(
                    name,
                    "ignored",
                    f"the gateway sets {name} from {OWN_FIELD_SOURCES.get(name, name)}",
                )
        return native.body

    def _put_size(self, call: _Call, native: NativeBody) -> None:
        job, model = call.job, call.model
        if job.width is None or job.height is None:
            return  # no size layer in the stack: fal's default size
        size = (job.width, job.height)
        value: str | dict[str, int]
        if size in model.size_names:
            value = model.size_names[size]
        elif model.custom_sizes:
            value = {"width": job.width, "height": job.height}
        else:
            raise InvalidRequest(
                f"This model's provider makes only {', '.join(model.size_names.values())} "
                f"sizes; {job.width}x{job.height} is not one of them.",
                param="size",
            )
        native.body[model.size_field] = value
        _note_size(job, f"sent as {model.size_field}={json.dumps(value, separators=(',', ':'))}")

    # --- the two protocols ----------------------------------------------------------

    async def _run_sync(self, call: _Call, url: str, body: dict[str, Any]) -> Any:
        response = await self._send(call, "POST", url, json=body)
        if response.status_code != 200:
            raise self._error(call, response)
        return _json(response, "output")

    async def _run_queued(self, call: _Call, url: str, body: dict[str, Any]) -> Any:
        response = await self._send(call, "POST", url, json=body)
        if response.status_code not in (200, 201, 202):
            raise self._error(call, response)
        ticket = _json(response, "queue ticket")
        status_url, response_url, cancel_url = (
            _url_in(ticket, name) for name in ("status_url", "response_url", "cancel_url")
        )
        for name, url in (
            ("status_url", status_url),
            ("response_url", response_url),
            ("cancel_url", cancel_url),
        ):
            call.hosts.check(url, name)
        await self._report(call, ticket)

        async def cancel() -> None:
            await self._runtime.fetcher.check_url(cancel_url)
            answer = await self._runtime.http.put(cancel_url, headers=call.headers)
            logger.info("cancelled fal request (HTTP %d)", answer.status_code)

        # The poll timeout sits outside the cancel guard so that giving up cancels the task too.
        with call.options.deadline("fal request"):
            async with cancel_upstream_on_exit(cancel):
                final = await self._poll(call, status_url, response.headers.get("retry-after"))

        await self._runtime.fetcher.check_url(response_url)
        result = await self._send(call, "GET", response_url)
        if result.status_code != 200:
            # A failed run's result URL carries fal's real error (status and detail).
            raise self._error(call, result)
        if final.get("error"):
            raise _run_failure(final, call.key)
        return _json(result, "output")

    async def _poll(self, call: _Call, status_url: str, retry_after: str | None) -> dict[str, Any]:
        options = call.options
        backoff = options.backoff()
        params = {"logs": "1"} if options.logs else None
        seen_logs = 0
        transient = 0
        await self._runtime.fetcher.check_url(status_url)
        while True:
            await backoff.wait(retry_after)
            response = await self._send(call, "GET", status_url, params=params)
            retry_after = response.headers.get("retry-after")
            if response.status_code in TRANSIENT_POLL_STATUSES:
                transient += 1
                if transient <= MAX_TRANSIENT_POLLS:
                    continue
            if response.status_code not in (200, 202):
                raise self._error(call, response)
            transient = 0
            status = _json(response, "status")
            if not isinstance(status, dict) or not isinstance(status.get("status"), str):
                raise UpstreamError("fal answered a status poll without a status.")
            await self._report(call, status)
            seen_logs = _log_lines(status, seen_logs)
            if status["status"] == COMPLETED:
                return status
            if status["status"] not in WAITING:
                raise UpstreamError(f"fal reported an unknown status {status['status']!r}.")

    async def _send(
        self,
        call: _Call,
        method: str,
        url: str,
        *,
        json: Any = None,
        params: dict[str, str] | None = None,
    ) -> httpx.Response:
        with upstream_transport_errors(self.name):
            return await self._runtime.http.request(
                method, url, json=json, params=params, headers=call.headers
            )

    async def _report(self, call: _Call, status: dict[str, Any]) -> None:
        position = status.get("queue_position")
        state = str(status.get("status", "IN_QUEUE"))
        await call.job.progress(
            Progress(
                provider=self.name,
                status=state,
                queue_position=position if isinstance(position, int) else None,
                fraction=1.0 if state == COMPLETED else None,
            )
        )

    # --- output -------------------------------------------------------------------

    def _images(self, call: _Call, output: Any) -> list[GeneratedImage]:
        items = output.get("images") if isinstance(output, dict) else None
        if not isinstance(items, list) or not items:
            raise UpstreamError("fal answered without any images.")
        flags = output.get("has_nsfw_concepts")
        checker_on = call.job.fields.get("enable_safety_checker") is not False
        if checker_on and isinstance(flags, list) and any(flag is True for flag in flags):
            # fal's safety checker blanks flagged images. A request gets n usable images or
            # an error, never fewer or blank ones; with the checker off the flags are advisory.
            flagged = sum(flag is True for flag in flags)
            raise ContentPolicyViolation(
                f"fal's safety checker flagged {flagged} of {len(items)} generated image(s) "
                "as not safe for work; no images are returned."
            )
        if len(items) < call.job.n:
            raise UpstreamError(
                f"fal returned {len(items)} image(s) where {call.job.n} were asked."
            )
        seed = output.get("seed")
        images = []
        for item in items[: call.job.n]:
            url = item.get("url") if isinstance(item, dict) else None
            if not isinstance(url, str):
                raise UpstreamError("fal returned an image entry without a URL.")
            width, height = item.get("width"), item.get("height")
            image = GeneratedImage(
                seed=seed if isinstance(seed, int) else None,
                width=width if isinstance(width, int) else None,
                height=height if isinstance(height, int) else None,
            )
            if url.startswith("data:"):
                # sync_mode: the image is inline. Bytes, so no data: URI travels further.
                image.data = _decode_data_uri(url)
            else:
                image.url = url
            images.append(image)
        return images

    # --- errors -------------------------------------------------------------------

    def _error(self, call: _Call, response: httpx.Response) -> GatewayError:
        status = response.status_code
        if status in (401, 402, 403, 429):
            return error_for_status(response, provider=self.name, secrets=[call.key])
        try:
            body = response.json()
        except (ValueError, UnicodeDecodeError):
            body = None
        detail = body.get("detail") if isinstance(body, dict) else None
        items = (
            [item for item in detail if isinstance(item, dict)] if isinstance(detail, list) else []
        )
        for item in items:
            if item.get("type") == "content_policy_violation":
                return ContentPolicyViolation(
                    "fal's content checker refused the request: "
                    + redact(str(item.get("msg", "content policy violation")), [call.key])
                )
        error_type = response.headers.get("x-fal-error-type") or (
            body.get("error_type") if isinstance(body, dict) else None
        )
        if isinstance(error_type, str) and error_type:
            return _infrastructure_error(error_type, detail, call.key)
        for item in items:
            fault = UPSTREAM_FAULTS.get(str(item.get("type")))
            if fault is not None:
                return fault(f"fal failed: {_item_text(item, call.key)} ({item.get('type')}).")
        if status in (400, 422) and items:
            item = items[0]
            return InvalidRequest(
                f"fal rejected the request: {_item_text(item, call.key)}",
                param=_public_param(call, item.get("loc")),
            )
        return error_for_status(response, provider=self.name, secrets=[call.key])


def _note_size(job: ImageJob, detail: str) -> None:
    """Add fal's size field to the report of whichever size parameter the client sent."""
    sent = job.request.model_fields_set
    for param in SIZE_PARAMS:
        if param not in sent or getattr(job.request, param) is None:
            continue
        entry = job.report.get(param)
        if entry is None:
            job.report.record(param, "converted", detail)
        elif entry.handling == "passthrough":
            # "1024x768" went out as a preset name or a width/height object: converted.
            job.report.record(param, "converted", f"{entry.detail}; {detail}")
        elif entry.handling != "ignored":
            job.report.record(param, entry.handling, f"{entry.detail}; {detail}")


def _public_param(call: _Call, loc: Any) -> str | None:
    """The client's name for the fal field a validation error points at."""
    if not isinstance(loc, list) or len(loc) < 2 or loc[0] != "body":
        return None
    return public_param(call.job, str(loc[1]), size_fields=frozenset({call.model.size_field}))


def _item_text(item: dict[str, Any], key: str) -> str:
    loc = item.get("loc")
    where = ".".join(str(part) for part in loc[1:]) if isinstance(loc, list) else ""
    message = str(item.get("msg", "invalid input"))
    return redact(f"{where}: {message}" if where else message, [key])


def _infrastructure_error(error_type: str, detail: Any, key: str) -> UpstreamError:
    text = redact(detail if isinstance(detail, str) else error_type, [key])
    if error_type.endswith("_timeout"):
        return UpstreamTimeout(f"fal timed out ({error_type}): {text}")
    return UpstreamError(f"fal failed ({error_type}): {text}")


def _run_failure(status: dict[str, Any], key: str) -> UpstreamError:
    error_type = status.get("error_type")
    return _infrastructure_error(
        error_type if isinstance(error_type, str) else "run_failed", str(status["error"]), key
    )


def _json(response: httpx.Response, what: str) -> Any:
    return upstream_json(response, provider="fal", what=what)


def _url_in(ticket: Any, name: str) -> str:
    value = ticket.get(name) if isinstance(ticket, dict) else None
    if not isinstance(value, str) or not value:
        raise UpstreamError(f"fal's queue ticket has no {name}.")
    return value


def _log_lines(status: dict[str, Any], seen: int) -> int:
    logs = status.get("logs")
    if not isinstance(logs, list):
        return seen
    for entry in logs[seen:]:
        message = entry.get("message") if isinstance(entry, dict) else entry
        logger.debug("fal: %s", message)
    return max(seen, len(logs))


def _decode_data_uri(uri: str) -> bytes:
    header, _, payload = uri.partition(",")
    if not header.endswith(";base64"):
        raise UpstreamError("fal returned an inline image that is not base64.")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise UpstreamError("fal returned a malformed inline image.") from None


__all__ = ["MODELS", "FalModel", "FalOptions", "FalProvider"]
