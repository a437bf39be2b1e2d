"""Black Forest Labs' own API as a flux-proxy provider: one task per image.

Protocol (the shared PROVIDERS.md, section 1; this package's README):

- ``POST {base_url}/v1/{model}`` with the model's inputs as the JSON body and the key in
  the ``x-key`` header. The answer is ``{"id", "polling_url", "cost", ...}``.
- ``GET {polling_url}`` with ``x-key`` until ``status`` is terminal. The URL is followed
  exactly as given: BFL hands out URLs on other hosts (``api.eu2.bfl.ai``, ...) than the
  one the task was submitted to, so it is never built from the id.
- ``Ready`` carries ``result.sample``, a signed URL that expires after ten minutes; the
  core downloads it straight away (through its private-address guard).
- BFL has no cancel endpoint: a request that goes away stops polling, and the task runs
  to its end (and is billed) on BFL's side.

Model ``options``:

- ``poll_interval``: first wait between polls when BFL gives no ``Retry-After``, in
  seconds (default 0.5); later waits grow to ``poll_max_interval`` (default 5).
  BFL's own ``Retry-After`` (1 s in practice) wins, capped at the larger of the two.
- ``poll_timeout``: give up with a 504 after polling this many seconds; unset: only the
  request's own deadline (``limits.request_timeout``).
- ``trusted_hosts`` (older name ``polling_hosts``): hosts a polling URL may name besides
  ``*.bfl.ai``, ``*.bfl.ml`` and the ``base_url``'s origin. The key travels with every
  poll, so other hosts are refused.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx
from pydantic import AliasChoices, Field, model_validator

from flux_proxy.capabilities import Capabilities, SizeSupport
from flux_proxy.config import ProviderConfig
from flux_proxy.errors import (
    ContentPolicyViolation,
    GatewayError,
    InvalidRequest,
    UpstreamError,
    redact,
)
from flux_proxy.fields import SIZE_PARAMS, FieldRule, NativeBody, public_param
from flux_proxy.hosts import KeyHosts
from flux_proxy.polling import PollingOptions
from flux_proxy.providers.base import provider_options
from flux_proxy.runtime import Runtime
from flux_proxy.schema import GeneratedImage, Handling, ImageJob, Progress
from flux_proxy.upstream import (
    MAX_MESSAGE,
    error_for_status,
    upstream_json,
    upstream_transport_errors,
)

DEFAULT_BASE_URL = "https://api.bfl.ai"
DEFAULT_MODEL = "flux-pro-1.1"
DEFAULT_KEY_ENV = "BFL_API_KEY"

# What each status of BFL's ``StatusResponse`` enum means for the poll loop. A status
# not listed here (BFL adding, say, "Queued") is treated as still running: the request's
# deadline and ``poll_timeout`` bound the wait either way. "Failed" is not in BFL's spec
# but some clients meet it; it is read like "Error".
Outcome = Literal["running", "ready", "moderated", "failed"]
STATUS_OUTCOMES: dict[str, Outcome] = {
    "Pending": "running",
    "Ready": "ready",
    "Request Moderated": "moderated",
    "Content Moderated": "moderated",
    "Error": "failed",
    "Failed": "failed",
    "Task not found": "failed",
}
MODERATION_WHAT = {
    "Request Moderated": "the request (prompt or input image)",
    "Content Moderated": "the generated image",
}

# BFL's range for safety_tolerance is 0 (strictest) to 6. The public contract (fal,
# Replicate) starts at 1; 0 is BFL's own stricter level and is kept open because
# refusing a value the upstream accepts would be the gateway's invention.
SAFETY_TOLERANCE = FieldRule(type="integer", minimum=0, maximum=6)
COMMON_FIELDS: dict[str, FieldRule] = {
    "safety_tolerance": SAFETY_TOLERANCE,
    "prompt_upsampling": FieldRule(type="boolean"),
}

# FLUX 1.1 [pro] Ultra makes about 4 megapixels, shaped by ``aspect_ratio`` alone. BFL
# does not publish the pixel sizes; these are the ones its Ultra outputs are known at
# (UNCERTAIN, the same table the replicate plugin uses). An error here costs a resize,
# never a wrong answer: the core fits whatever comes back to the size asked for.
ULTRA_SIZES: dict[str, tuple[int, int]] = {
    "21:9": (3136, 1344),
    "16:9": (2752, 1536),
    "3:2": (2496, 1664),
    "4:3": (2368, 1792),
    "1:1": (2048, 2048),
    "3:4": (1792, 2368),
    "2:3": (1664, 2496),
    "9:16": (1536, 2752),
    "9:21": (1344, 3136),
}


@dataclass(frozen=True, slots=True)
class BflModel:
    """One BFL endpoint: where it lives, what it makes, and how it is told the size."""

    path: str
    title: str
    capabilities: Capabilities
    # Set for models that take ``aspect_ratio`` instead of width/height: the ratio text
    # to send for each native size (the model's ``sizes.presets``).
    ratio_of_size: Mapping[tuple[int, int], str] = field(default_factory=dict)


MODELS: dict[str, BflModel] = {
    "flux-pro-1.1": BflModel(
        path="/v1/flux-pro-1.1",
        title="FLUX 1.1 [pro]",
        capabilities=Capabilities(
            # FluxPro11Inputs: width and height 256-1440, multiples of 32.
            sizes=SizeSupport(min_side=256, max_side=1440, multiple_of=32),
            max_images_per_call=1,
            # jpeg is BFL's default; BFL has no quality field (the core encodes).
            output_formats=("jpeg", "png", "webp"),
            accepts_compression=False,
            fields=COMMON_FIELDS,
        ),
    ),
    "flux-pro-1.1-ultra": BflModel(
        path="/v1/flux-pro-1.1-ultra",
        title="FLUX 1.1 [pro] Ultra",
        capabilities=Capabilities(
            sizes=SizeSupport(presets=tuple(ULTRA_SIZES.values())),
            # Shapes at the 1K tier are exactly half the native sizes, so "2K" asks for
            # (and gets) the native pixels without a resize.
            ratios={ratio: (w // 2, h // 2) for ratio, (w, h) in ULTRA_SIZES.items()},
            default_size=ULTRA_SIZES["1:1"],
            max_images_per_call=1,
            output_formats=("jpeg", "png", "webp"),
            accepts_compression=False,
            fields={
                **COMMON_FIELDS,
                "raw": FieldRule(type="boolean"),
                "image_prompt_strength": FieldRule(type="number", minimum=0, maximum=1),
            },
        ),
        ratio_of_size={size: ratio for ratio, size in ULTRA_SIZES.items()},
    ),
}

# Client fields the provider does not forward, and why. width/height: the gateway's size
# decides what is asked for (and resizes to its target), so a client's own value would
# only contradict it. The webhook fields: with a webhook BFL answers without a polling
# URL, and the gateway must poll to return the image in its response.
IGNORED_FIELDS: dict[str, str] = {
    "width": "use size; the gateway sets width/height from it",
    "height": "use size; the gateway sets width/height from it",
}
REJECTED_FIELDS: dict[str, str] = {
    "webhook_url": "the gateway polls BFL itself and returns the image in its response",
    "webhook_secret": "the gateway polls BFL itself and returns the image in its response",
}
# Hosts the gateway sends its x-key to when a polling URL names them, besides the
# configured base_url's origin: BFL's regional and per-cluster hosts (api.eu2.bfl.ai,
# gateway.bfl.ai, ...) and the legacy bfl.ml domain. A polling URL anywhere else would
# get the key too, so it is refused unless listed in the ``trusted_hosts`` option.
KEY_HOSTS = ("bfl.ai", "*.bfl.ai", "bfl.ml", "*.bfl.ml")
# BFL's body fields that carry a public parameter under another name (for 422s).
SIZE_FIELDS = frozenset({"width", "height", "aspect_ratio"})


class BflOptions(PollingOptions):
    """The model entry's ``options`` (checked when the gateway starts)."""

    # ``polling_hosts`` is this plugin's older name for the shared option.
    trusted_hosts: tuple[str, ...] = Field(
        (), validation_alias=AliasChoices("trusted_hosts", "polling_hosts")
    )

    @model_validator(mode="after")
    def _interval_order(self) -> BflOptions:
        if self.poll_interval > self.poll_max_interval:
            raise ValueError("poll_interval must not exceed poll_max_interval")
        return self


def bfl_model(config: ProviderConfig) -> BflModel:
    name = config.upstream_model or DEFAULT_MODEL
    model = MODELS.get(name)
    if model is None:
        known = ", ".join(MODELS)
        raise ValueError(f"upstream_model {name!r} is not a BFL model this plugin knows ({known})")
    return model


def _options(config: ProviderConfig) -> BflOptions:
    return provider_options(BflOptions, config)


class BflProvider:
    name = "bfl"
    default_model = DEFAULT_MODEL
    key_hosts = KEY_HOSTS

    def __init__(self, runtime: Runtime) -> None:
        self._runtime = runtime

    def capabilities(self, config: ProviderConfig) -> Capabilities:
        _options(config)  # a typo in options fails at startup, not on the first request
        return bfl_model(config).capabilities

    def description(self, config: ProviderConfig) -> str:
        return f"{bfl_model(config).title} via Black Forest Labs' API"

    async def generate(self, job: ImageJob) -> list[GeneratedImage]:
        config = job.route.config
        model = bfl_model(config)
        options = _options(config)
        body = self._body(job, model)
        key_env = config.api_key_env or DEFAULT_KEY_ENV
        key = self._runtime.upstream_key(key_env)
        base_url = _base_url(config.base_url)
        headers = {"x-key": key}
        with upstream_transport_errors(self.name):
            response = await self._runtime.http.post(
                f"{base_url}{model.path}", json=body, headers=headers
            )
        if response.status_code != 200:
            raise self._error(response, job, key)
        task = _json_object(response, "submit")
        polling_url = task.get("polling_url")
        if not isinstance(polling_url, str) or not polling_url:
            raise UpstreamError("The bfl upstream accepted the task but gave no polling_url.")
        key_hosts(base_url, options).check(polling_url, "polling URL")
        with options.deadline("bfl task"):
            result = await self._poll(job, polling_url, key, options)
        return [self._image(job, result)]

    def _body(self, job: ImageJob, model: BflModel) -> dict[str, Any]:
        for name, reason in REJECTED_FIELDS.items():
            if name in job.fields:
                raise InvalidRequest(
                    f"'{name}' cannot be used through this gateway: {reason}.", param=name
                )
        native = NativeBody(job)
        native.put("prompt", job.request.prompt)
        if job.width is not None and job.height is not None:
            size = (job.width, job.height)
            if model.ratio_of_size:
                # A size from a config override of the presets still goes as its ratio.
                ratio = model.ratio_of_size.get(size) or _reduced_ratio(*size)
                native.body["aspect_ratio"] = ratio
                _report_size(job, f"sent as aspect_ratio={ratio}")
            else:
                native.body["width"], native.body["height"] = size
                _report_size(job, f"sent as width={size[0]}, height={size[1]}")
        if job.seed is not None:
            native.put("seed", job.seed)
        if job.output_format is not None:
            # Always sent, even BFL's default jpeg: the format layer counts on getting it.
            native.body["output_format"] = job.output_format
        # NativeBody.put_fields() would forward every extra; the ignored ones must not go.
        for name, value in job.fields.items():
            if name in IGNORED_FIELDS:
                job.report.record(name, "ignored", IGNORED_FIELDS[name])
            else:
                native.body.setdefault(name, value)
        return native.body

    async def _poll(self, job: ImageJob, url: str, key: str, options: BflOptions) -> dict[str, Any]:
        await self._runtime.fetcher.check_url(url)
        backoff = options.backoff()
        while True:
            with upstream_transport_errors(self.name):
                response = await self._runtime.http.get(url, headers={"x-key": key})
            retry_after = response.headers.get("retry-after")
            if response.status_code == 429:
                # Too many polls is no reason to give the task up: wait and ask again.
                await backoff.wait(retry_after)
                continue
            if response.status_code != 200:
                raise error_for_status(response, provider=self.name, secrets=[key])
            payload = _json_object(response, "poll")
            status = payload.get("status")
            if not isinstance(status, str):
                raise UpstreamError("The bfl upstream answered a poll without a status.")
            await job.progress(
                Progress(
                    provider=self.name, status=status, fraction=_fraction(payload.get("progress"))
                )
            )
            outcome = STATUS_OUTCOMES.get(status, "running")
            if outcome == "ready":
                return payload
            if outcome == "moderated":
                raise _moderated(status, payload.get("details"))
            if outcome == "failed":
                raise _failed(status, payload.get("details"), key)
            await backoff.wait(retry_after)

    def _image(self, job: ImageJob, payload: dict[str, Any]) -> GeneratedImage:
        result = payload.get("result")
        if not isinstance(result, dict) or not isinstance(result.get("sample"), str):
            raise UpstreamError("The bfl upstream reported the task Ready without an image.")
        sample: str = result["sample"]
        if not sample:
            raise UpstreamError("The bfl upstream reported the task Ready with an empty image URL.")
        seed = result.get("seed")
        used_prompt = result.get("prompt")
        # With prompt_upsampling BFL rewrites the prompt; that rewrite is OpenAI's revised_prompt.
        revised = (
            used_prompt
            if isinstance(used_prompt, str) and used_prompt and used_prompt != job.request.prompt
            else None
        )
        return GeneratedImage(
            url=sample,
            seed=seed if isinstance(seed, int) and not isinstance(seed, bool) else job.seed,
            revised_prompt=revised,
        )

    def _error(self, response: httpx.Response, job: ImageJob, key: str) -> GatewayError:
        if response.status_code == 422:
            error = _validation_error(response, job, key)
            if error is not None:
                return error
        return error_for_status(response, provider=self.name, secrets=[key])


def _base_url(configured: str | None) -> str:
    base = (configured or DEFAULT_BASE_URL).rstrip("/")
    # The model paths start with /v1; a base_url written like other providers' (".../v1")
    # must not double it.
    return base.removesuffix("/v1")


def key_hosts(base_url: str, options: BflOptions) -> KeyHosts:
    """Where the x-key may go: BFL's hosts, the base_url's origin, the configured ones."""
    return KeyHosts("bfl", (*KEY_HOSTS, *options.trusted_hosts), base_url)


def _reduced_ratio(width: int, height: int) -> str:
    divisor = math.gcd(width, height)
    return f"{width // divisor}:{height // divisor}"


def _report_size(job: ImageJob, sent_as: str) -> None:
    """Say how the size reached BFL, keeping what the size layer said about resizing."""
    for param in SIZE_PARAMS:
        entry = job.report.get(param)
        if entry is None or entry.handling == "ignored":
            continue
        # "emulated" means the gateway resizes BFL's output; otherwise BFL makes the
        # target itself, from a native form of it (width/height or a ratio): converted.
        handling: Handling = "emulated" if entry.handling == "emulated" else "converted"
        job.report.record(param, handling, f"{sent_as}; {entry.detail}")


def _json_object(response: httpx.Response, step: str) -> dict[str, Any]:
    payload = upstream_json(response, provider="bfl", what=step)
    if not isinstance(payload, dict):
        raise UpstreamError(f"The bfl upstream answered the {step} with something other than JSON.")
    return payload


def _fraction(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return min(1.0, max(0.0, float(value)))


def _moderated(status: str, details: Any) -> ContentPolicyViolation:
    reasons = details.get("Moderation Reasons") if isinstance(details, dict) else None
    named = [str(reason) for reason in reasons] if isinstance(reasons, list) else []
    because = f" Moderation reasons: {', '.join(named)}." if named else ""
    what = MODERATION_WHAT.get(status, "the request")
    return ContentPolicyViolation(
        f"Black Forest Labs' moderation rejected {what} ({status}).{because}"
    )


def _failed(status: str, details: Any, key: str) -> UpstreamError:
    if status == "Task not found":
        return UpstreamError("The bfl upstream no longer knows the task (status 'Task not found').")
    said = f": {redact(str(details), [key])[:MAX_MESSAGE]}" if details else ""
    return UpstreamError(f"The bfl task failed (status '{status}'){said}")


def _validation_error(response: httpx.Response, job: ImageJob, key: str) -> InvalidRequest | None:
    """BFL's FastAPI 422 as a 400 naming the public parameter the client sent."""
    try:
        detail = response.json().get("detail")
    except (ValueError, UnicodeDecodeError, AttributeError):
        return None
    if not isinstance(detail, list) or not detail or not isinstance(detail[0], dict):
        return None
    first = detail[0]
    loc = first.get("loc")
    names = [part for part in loc if isinstance(part, str) and part != "body"] if loc else []
    field_name = names[0] if names else None
    param = public_param(job, field_name, size_fields=SIZE_FIELDS) if field_name else None
    message = redact(str(first.get("msg") or "invalid value"), [key])[:MAX_MESSAGE]
    where = f" '{param}'" if param else ""
    sent = f" (sent to BFL as {field_name})" if field_name and field_name != param else ""
    return InvalidRequest(f"The bfl upstream rejected{where}{sent}: {message}", param=param)
