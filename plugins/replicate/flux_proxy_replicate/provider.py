"""Replicate as a flux-proxy provider: one prediction per image.

Protocol (see the README and the shared PROVIDERS.md, section 3):

- ``POST {base_url}/v1/models/{owner}/{name}/predictions`` with ``{"input": {...}}``;
  every provider field, passthrough ones included, goes inside ``input``.
- ``Authorization: Bearer <REPLICATE_API_TOKEN>``; ``Prefer: wait`` asks Replicate to
  hold the answer until the prediction is done (up to 60 s).
- A prediction that is not done yet (``starting``/``processing``) is polled at the
  ``urls.get`` it names, and cancelled at ``urls.cancel`` when the request goes away.
- ``output`` is one URI (a list of URIs is accepted too); the core fetches it.

Model ``options``:

- ``wait_seconds``: 0-60. Unset sends ``Prefer: wait`` (Replicate's own maximum);
  N sends ``Prefer: wait=N``; 0 sends no ``Prefer`` header (create, then poll).
  The wait is kept below ``limits.upstream_timeout`` so the create call cannot time
  out on the gateway's side while the prediction runs on, unseen and billed.
- ``poll_interval``: first wait between polls, in seconds (default 0.5); later waits
  grow to ``poll_max_interval`` (default 5). A ``Retry-After`` from Replicate wins.
- ``poll_timeout``: give up (504, and cancel the prediction) after this many seconds
  of polling; unset: only the request's own deadline (``limits.request_timeout``).
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx
from pydantic import Field

from flux_proxy.capabilities import Capabilities, SizeSupport
from flux_proxy.config import ConfigError, ProviderConfig
from flux_proxy.errors import (
    ContentPolicyViolation,
    GatewayError,
    InvalidRequest,
    UpstreamError,
    UpstreamTimeout,
    redact,
)
from flux_proxy.fields import FieldRule, NativeBody, public_param
from flux_proxy.hosts import KeyHosts
from flux_proxy.polling import PollingOptions, cancel_upstream_on_exit
from flux_proxy.providers.base import provider_options
from flux_proxy.runtime import Runtime
from flux_proxy.schema import GeneratedImage, ImageJob, Progress
from flux_proxy.upstream import error_for_status, upstream_json, upstream_transport_errors

DEFAULT_BASE_URL = "https://api.replicate.com"
DEFAULT_MODEL = "black-forest-labs/flux-1.1-pro"
DEFAULT_KEY_ENV = "REPLICATE_API_TOKEN"

RUNNING_STATUSES = frozenset({"starting", "processing"})
TERMINAL_STATUSES = frozenset({"succeeded", "failed", "canceled"})
# Replicate's safety checker fails the prediction with this code / wording.
MODERATION_MARKERS = ("e005", "flagged as sensitive")
# A cancellation whose error says one of these was a deadline on Replicate's side (504).
TIMEOUT_MARKERS = ("timed out", "timeout", "time limit", "deadline")
# Replicate's API hosts: with the configured base_url and the trusted_hosts option, the
# only ones that get the token when a prediction's urls name them. Outputs
# (replicate.delivery) are downloaded without it.
KEY_HOSTS = ("replicate.com", "*.replicate.com")
# Replicate keeps Prefer: wait open for at most this long.
MAX_WAIT_SECONDS = 60

# FLUX 1.1 [pro] Ultra makes about 4 megapixels per aspect ratio. Replicate does not
# publish the pixel sizes; these are BFL's Ultra sizes (UNCERTAIN for Replicate). The
# gateway resizes whatever comes back to the size asked for, so an error here costs
# a resize, never a wrong answer.
ULTRA_SIZES: dict[str, tuple[int, int]] = {
    "21:9": (3136, 1344),
    "16:9": (2752, 1536),
    "3:2": (2496, 1664),
    "4:3": (2368, 1792),
    "5:4": (2304, 1856),
    "1:1": (2048, 2048),
    "4:5": (1856, 2304),
    "3:4": (1792, 2368),
    "2:3": (1664, 2496),
    "9:16": (1536, 2752),
    "9:21": (1344, 3136),
}

# Public field -> Replicate's name, type and range (checked before the call, so a bad
# value is a 400 naming the public field rather than a paid round trip).
PRO_FIELDS: dict[str, FieldRule] = {
    "output_format": FieldRule(values={"jpeg": "jpg"}),
    "output_compression": FieldRule(name="output_quality", type="integer", minimum=0, maximum=100),
    # 1-6 in version 96ccd0e7; an older version says 1-5. Declaring 1-6 lets both answer.
    "safety_tolerance": FieldRule(type="integer", minimum=1, maximum=6),
    "prompt_upsampling": FieldRule(type="boolean"),
    "seed": FieldRule(type="integer"),
}
ULTRA_FIELDS: dict[str, FieldRule] = {
    "output_format": FieldRule(values={"jpeg": "jpg"}),
    "safety_tolerance": FieldRule(type="integer", minimum=1, maximum=6),
    "raw": FieldRule(type="boolean"),
    "image_prompt_strength": FieldRule(type="number", minimum=0, maximum=1),
    "seed": FieldRule(type="integer"),
}


@dataclass(frozen=True, slots=True)
class ReplicateModel:
    """What one Replicate model makes, and how a pixel size reaches it."""

    capabilities: Capabilities
    # "custom": aspect_ratio="custom" plus width/height (exact pixels, so the gateway
    # knows what it gets); "enum": the aspect_ratio preset nearest the size.
    size_mode: Literal["custom", "enum"]
    # Preset aspect ratio -> the pixel size it makes ("enum" models).
    aspect_ratios: dict[str, tuple[int, int]] = field(default_factory=dict)


MODELS: dict[str, ReplicateModel] = {
    "black-forest-labs/flux-1.1-pro": ReplicateModel(
        capabilities=Capabilities(
            # 256-1440 per side; multiples of 32 in the current version, 16 in an older
            # one, so asking for multiples of 32 suits both.
            sizes=SizeSupport(min_side=256, max_side=1440, multiple_of=32),
            max_images_per_call=1,
            # Replicate's default (webp) first.
            output_formats=("webp", "jpeg", "png"),
            accepts_compression=True,
            fields=PRO_FIELDS,
        ),
        size_mode="custom",
    ),
    "black-forest-labs/flux-1.1-pro-ultra": ReplicateModel(
        capabilities=Capabilities(
            sizes=SizeSupport(presets=tuple(ULTRA_SIZES.values())),
            # Half of each 4 MP size is its 1 MP shape, so resolution "2K" asks for
            # exactly what the model makes.
            ratios={key: (w // 2, h // 2) for key, (w, h) in ULTRA_SIZES.items()},
            default_size=ULTRA_SIZES["1:1"],
            max_images_per_call=1,
            output_formats=("jpeg", "png"),
            accepts_compression=False,
            fields=ULTRA_FIELDS,
        ),
        size_mode="enum",
        aspect_ratios=ULTRA_SIZES,
    ),
}

# Replicate's input field (as named in a 422's invalid_fields) -> the public parameter.
# Fields not listed are reported under their own name (minus "input.").
SIZE_FIELDS = frozenset({"width", "height", "aspect_ratio"})

logger = logging.getLogger("flux_proxy.replicate")

_PERCENT = re.compile(r"(\d{1,3})%")


class ReplicateOptions(PollingOptions):
    wait_seconds: int | None = Field(None, ge=0, le=MAX_WAIT_SECONDS)


class ReplicateProvider:
    name = "replicate"
    default_model = DEFAULT_MODEL

    def __init__(self, runtime: Runtime) -> None:
        self._runtime = runtime

    # --- declaration --------------------------------------------------------------

    def capabilities(self, model: ProviderConfig) -> Capabilities:
        _options(model)  # a bad option fails at startup, not on the first request
        return _model(model).capabilities

    def description(self, model: ProviderConfig) -> str:
        return f"{_model_id(model)} on Replicate"

    # --- generation ---------------------------------------------------------------

    async def generate(self, job: ImageJob) -> list[GeneratedImage]:
        config = job.route.config
        model_id = _model_id(config)
        spec = _model(config)
        options = _options(config)
        key_env = config.api_key_env or DEFAULT_KEY_ENV
        key = self._runtime.upstream_key(key_env)
        headers = {"Authorization": f"Bearer {key}"}
        prefer = _prefer(options, self._runtime.settings.limits.upstream_timeout)
        if prefer:
            headers["Prefer"] = prefer
        body = {"input": self._input(job, spec)}
        with upstream_transport_errors(self.name):
            response = await self._runtime.http.post(
                f"{_base_url(config)}/v1/models/{model_id}/predictions", json=body, headers=headers
            )
        if not response.is_success:  # 201 is usual; an older spec says 200
            raise self._error(response, job, key)
        prediction = self._prediction(response, key)
        if prediction["status"] not in TERMINAL_STATUSES:
            prediction = await self._poll(prediction, response, job, key, options)
        return await self._images(prediction, job, key)

    def _input(self, job: ImageJob, spec: ReplicateModel) -> dict[str, Any]:
        native = NativeBody(job)
        native.put("prompt", job.request.prompt)
        if job.width and job.height:
            self._put_size(job, native, spec)
        if job.seed is not None:
            native.put("seed", job.seed)
        if job.output_format:
            native.put("output_format", job.output_format)
        if job.output_compression is not None and spec.capabilities.accepts_compression:
            native.put("output_compression", job.output_compression)
        set_by_gateway = set(native.body)
        native.put_fields()
        for name in job.fields:
            # A client's own "width" (say) loses to the one the gateway derived from size.
            if name in set_by_gateway and name in job.request.extras:
                job.report.record(name, "ignored", "the gateway sets this field itself")
        return native.body

    @staticmethod
    def _put_size(job: ImageJob, native: NativeBody, spec: ReplicateModel) -> None:
        assert job.width and job.height
        if spec.size_mode == "custom":
            native.body.update(aspect_ratio="custom", width=job.width, height=job.height)
            form = f"aspect_ratio=custom, width={job.width}, height={job.height}"
        else:
            ratio = _nearest_ratio(job.width, job.height, spec.aspect_ratios)
            native.body["aspect_ratio"] = ratio
            form = f"aspect_ratio={ratio}"
        _report_size(job, form)

    # --- polling ------------------------------------------------------------------

    async def _poll(
        self,
        prediction: dict[str, Any],
        created: httpx.Response,
        job: ImageJob,
        key: str,
        options: ReplicateOptions,
    ) -> dict[str, Any]:
        urls = prediction.get("urls")
        urls = urls if isinstance(urls, dict) else {}
        get_url, cancel_url = urls.get("get"), urls.get("cancel")
        if not isinstance(get_url, str):
            raise UpstreamError(
                "The replicate upstream returned a running prediction without urls.get."
            )
        hosts = KeyHosts(
            self.name, (*KEY_HOSTS, *options.trusted_hosts), _base_url(job.route.config)
        )
        hosts.check(get_url, "urls.get")
        if isinstance(cancel_url, str):
            hosts.check(cancel_url, "urls.cancel")
        auth = {"Authorization": f"Bearer {key}"}

        async def cancel() -> None:
            if not isinstance(cancel_url, str):
                return  # nothing to cancel with; the prediction runs to its end
            await self._runtime.fetcher.check_url(cancel_url)
            await self._runtime.http.post(cancel_url, headers=auth)

        backoff = options.backoff()
        retry_after = created.headers.get("retry-after")
        with options.deadline("replicate prediction"):
            async with cancel_upstream_on_exit(cancel, on_error=True):
                while True:
                    await job.progress(_progress(self.name, prediction))
                    await backoff.wait(retry_after)
                    await self._runtime.fetcher.check_url(get_url)
                    with upstream_transport_errors(self.name):
                        response = await self._runtime.http.get(get_url, headers=auth)
                    retry_after = response.headers.get("retry-after")
                    if response.status_code == 429:
                        continue  # a throttled poll: wait what it says, ask again
                    if not response.is_success:
                        raise self._error(response, job, key)
                    prediction = self._prediction(response, key)
                    if prediction["status"] in TERMINAL_STATUSES:
                        return prediction

    # --- answers ------------------------------------------------------------------

    def _prediction(self, response: httpx.Response, key: str) -> dict[str, Any]:
        payload = upstream_json(response, provider=self.name, what="prediction")
        if not isinstance(payload, dict):
            raise UpstreamError("The replicate upstream answered without a prediction object.")
        status = payload.get("status")
        if status not in RUNNING_STATUSES and status not in TERMINAL_STATUSES:
            shown = redact(json.dumps(status)[:40], [key])
            raise UpstreamError(f"The replicate upstream reported an unknown status {shown}.")
        return payload

    async def _images(
        self, prediction: dict[str, Any], job: ImageJob, key: str
    ) -> list[GeneratedImage]:
        status = prediction["status"]
        error = prediction.get("error")
        message = redact(str(error)[:300], [key]) if error else ""
        if status == "failed":
            if any(marker in message.lower() for marker in MODERATION_MARKERS):
                raise ContentPolicyViolation(
                    "Your request was rejected by the provider's safety system "
                    f"(replicate: {message})."
                )
            raise UpstreamError(f"The replicate prediction failed: {message or 'no reason given'}")
        if status == "canceled":
            if any(word in message.lower() for word in TIMEOUT_MARKERS):
                raise UpstreamTimeout(f"The replicate prediction was cancelled: {message}")
            raise UpstreamError(
                "The replicate prediction was cancelled before it finished.",
                code="upstream_canceled",
            )
        output = prediction.get("output")
        outputs = [output] if isinstance(output, str) else output
        uris = [item for item in outputs or () if isinstance(item, str) and item]
        if not uris:
            removed = " (its data was removed)" if prediction.get("data_removed") else ""
            raise UpstreamError(f"The replicate prediction succeeded without an output{removed}.")
        images = []
        for uri in uris[: job.n]:
            if uri.startswith("data:"):
                # Some sync answers inline the file; decode it once, here.
                data = await self._runtime.fetcher.fetch(uri)
                images.append(GeneratedImage(data=data, seed=job.seed))
            else:
                images.append(GeneratedImage(url=uri, seed=job.seed))
        return images

    def _error(self, response: httpx.Response, job: ImageJob, key: str) -> GatewayError:
        error = error_for_status(response, provider=self.name, secrets=[key])
        if isinstance(error, InvalidRequest) and response.status_code == 422:
            mapped = _invalid_field(response, job)
            if mapped is not None:
                param, native, description = mapped
                error.param = param
                error.message = redact(
                    f"The replicate upstream rejected '{param}' (sent as {native}): {description}",
                    [key],
                )
        return error


# --- helpers ----------------------------------------------------------------------------


def _model_id(config: ProviderConfig) -> str:
    return config.upstream_model or DEFAULT_MODEL


def _model(config: ProviderConfig) -> ReplicateModel:
    model_id = _model_id(config)
    spec = MODELS.get(model_id)
    if spec is None:
        known = ", ".join(sorted(MODELS))
        raise ConfigError(
            f"replicate: upstream_model {model_id!r} is not one this plugin knows ({known})"
        )
    return spec


def _options(config: ProviderConfig) -> ReplicateOptions:
    return provider_options(ReplicateOptions, config)


def _base_url(config: ProviderConfig) -> str:
    base = (config.base_url or DEFAULT_BASE_URL).rstrip("/")
    # Accept "https://api.replicate.com/v1" too; the paths below add /v1 themselves.
    return base.removesuffix("/v1")


def _prefer(options: ReplicateOptions, upstream_timeout: float) -> str | None:
    wait = MAX_WAIT_SECONDS if options.wait_seconds is None else options.wait_seconds
    # Leave the HTTP exchange a few seconds beyond the hold.
    wait = min(wait, math.floor(upstream_timeout) - 5)
    if wait < 1:
        return None
    if options.wait_seconds is None and wait == MAX_WAIT_SECONDS:
        return "wait"
    return f"wait={wait}"


def _nearest_ratio(width: int, height: int, ratios: Mapping[str, tuple[int, int]]) -> str:
    target = math.log(width / height)
    return min(ratios, key=lambda key: abs(math.log(ratios[key][0] / ratios[key][1]) - target))


def _report_size(job: ImageJob, form: str) -> None:
    """Say in the report how the size reached Replicate (its native form)."""
    request = job.request
    sent = request.model_fields_set
    if "size" in sent and request.size is not None:
        params = ["size"]
    else:
        params = [p for p in ("aspect_ratio", "resolution") if p in sent and getattr(request, p)]
    for param in params:
        existing = job.report.get(param)
        if existing is None or existing.handling == "ignored":
            continue
        if existing.detail.startswith("sent as "):
            continue  # another call of the same fan-out said it already
        if existing.handling == "emulated":  # the gateway still resizes: keep saying so
            job.report.record(param, "emulated", f"sent as {form}; {existing.detail}")
        elif existing.handling == "converted":
            job.report.record(param, "converted", f"sent as {form} ({existing.detail})")
        else:
            job.report.record(param, "converted", f"sent as {form}")


def _invalid_field(response: httpx.Response, job: ImageJob) -> tuple[str, str, str] | None:
    """(public parameter, Replicate field, description) of a 422's first invalid field."""
    try:
        fields = response.json().get("invalid_fields")
    except (ValueError, UnicodeDecodeError, AttributeError):
        return None
    if not isinstance(fields, list) or not fields or not isinstance(fields[0], dict):
        return None
    native = str(fields[0].get("field", ""))
    description = str(fields[0].get("description", ""))[:300]
    name = native.removeprefix("input.")
    if not name or name == "input":
        return None  # e.g. a missing required field: no single public parameter to name
    return public_param(job, name, size_fields=SIZE_FIELDS), native, description


def _progress(provider: str, prediction: Mapping[str, Any]) -> Progress:
    logs = prediction.get("logs")
    fraction = None
    if isinstance(logs, str) and (found := _PERCENT.findall(logs)):
        fraction = min(int(found[-1]), 100) / 100
    return Progress(provider=provider, status=str(prediction.get("status")), fraction=fraction)
