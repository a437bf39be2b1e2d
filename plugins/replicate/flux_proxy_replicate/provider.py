"""Replicate as a flux-proxy provider: one prediction per image.

Protocol (see the README and the shared PROVIDERS.md, section 3):

- ``POST {base_url}/v1/models/{owner}/{name}/predictions`` with ``{"input": {...}}``;
  every provider field, passthrough ones included, goes inside ``input``.
- ``Authorization: Bearer <REPLICATE_API_TOKEN>``; ``Prefer: wait`` asks Replicate to
  hold the answer until the prediction is done (up to 60 s).
- A prediction that is not done yet (``starting``/``processing``) is polled at the
  ``urls.get`` it names, and cancelled at ``urls.cancel`` when the request goes away.
- ``output`` is one URI (a list of URIs is accepted too); the core fetches it.

Model ``options``: ``wait_seconds`` (0-60; unset sends ``Prefer: wait``, Replicate's own
maximum; N sends ``Prefer: wait=N``; 0 sends no ``Prefer`` header, create then poll; the
wait is kept below ``limits.upstream_timeout`` so the create call cannot time out on the
gateway's side while the prediction runs on, unseen and billed), and the shared polling
ones (``sdk.PollingOptions``: ``poll_interval``, ``poll_max_interval``, ``poll_timeout``,
``trusted_hosts``).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx
from pydantic import Field

from flux_proxy import sdk

RUNNING_STATUSES = frozenset({"starting", "processing"})
TERMINAL_STATUSES = frozenset({"succeeded", "failed", "canceled"})
# Replicate's safety checker fails the prediction with this code / wording.
MODERATION_MARKERS = ("e005", "flagged as sensitive")
# A cancellation whose error says one of these was a deadline on Replicate's side (504).
TIMEOUT_MARKERS = ("timed out", "timeout", "time limit", "deadline")
# Replicate keeps Prefer: wait open for at most this long.
MAX_WAIT_SECONDS = 60
# Replicate's Ultra takes 5:4 and 4:5 besides BFL's nine ratios.
ULTRA_RATIOS = (*sdk.FLUX_ULTRA_RATIOS, "5:4", "4:5")

# Public field -> Replicate's name, type and range (checked before the call, so a bad
# value is a 400 naming the public field rather than a paid round trip).
PRO_FIELDS: dict[str, sdk.FieldRule] = {
    "output_format": sdk.FieldRule(values={"jpeg": "jpg"}),
    "output_compression": sdk.FieldRule(
        name="output_quality", type="integer", minimum=0, maximum=100
    ),
    # 1-6 in version 96ccd0e7; an older version says 1-5. Declaring 1-6 lets both answer.
    "safety_tolerance": sdk.FieldRule(type="integer", minimum=1, maximum=6),
    "prompt_upsampling": sdk.FieldRule(type="boolean"),
    "seed": sdk.FieldRule(type="integer"),
}
ULTRA_FIELDS: dict[str, sdk.FieldRule] = {
    "output_format": sdk.FieldRule(values={"jpeg": "jpg"}),
    "safety_tolerance": sdk.FieldRule(type="integer", minimum=1, maximum=6),
    "raw": sdk.FieldRule(type="boolean"),
    "image_prompt_strength": sdk.FieldRule(type="number", minimum=0, maximum=1),
    "seed": sdk.FieldRule(type="integer"),
}


@dataclass(frozen=True, kw_only=True)
class ReplicateModel(sdk.ModelSpec):
    """What one Replicate model makes, and how a pixel size reaches it."""

    # "custom": aspect_ratio="custom" plus width/height (exact pixels, so the gateway
    # knows what it gets); "enum": the aspect_ratio preset nearest the size.
    size_mode: Literal["custom", "enum"]
    # Preset aspect ratio -> the pixel size it makes ("enum" models).
    aspect_ratios: Mapping[str, tuple[int, int]] = field(default_factory=dict)


MODELS: dict[str, ReplicateModel] = {
    "black-forest-labs/flux-1.1-pro": ReplicateModel(
        capabilities=sdk.Capabilities(
            # 256-1440 per side; multiples of 32 in the current version, 16 in an older
            # one, so asking for multiples of 32 suits both.
            sizes=sdk.SizeSupport(**sdk.FLUX_PRO_SIZES),
            max_images_per_call=1,
            # Replicate's default (webp) first.
            output_formats=("webp", "jpeg", "png"),
            accepts_compression=True,
            fields=PRO_FIELDS,
        ),
        size_mode="custom",
    ),
    "black-forest-labs/flux-1.1-pro-ultra": ReplicateModel(
        capabilities=sdk.flux_ultra_capabilities(
            ULTRA_RATIOS,
            max_images_per_call=1,
            output_formats=("jpeg", "png"),
            accepts_compression=False,
            fields=ULTRA_FIELDS,
        ),
        size_mode="enum",
        aspect_ratios={ratio: sdk.FLUX_ULTRA_SIZES[ratio] for ratio in ULTRA_RATIOS},
    ),
}

# Replicate's input fields that carry the public size (for 422s).
SIZE_FIELDS = frozenset({"width", "height", "aspect_ratio"})

_PERCENT = re.compile(r"(\d{1,3})%")


class ReplicateOptions(sdk.PollingOptions):
    wait_seconds: int | None = Field(None, ge=0, le=MAX_WAIT_SECONDS)


Entry = sdk.ModelEntry[ReplicateModel, ReplicateOptions]


class ReplicateProvider(sdk.UpstreamProvider[ReplicateModel, ReplicateOptions]):
    name = "replicate"
    key_env = "REPLICATE_API_TOKEN"
    base_url = "https://api.replicate.com"
    # Accept "https://api.replicate.com/v1" too; the paths below add /v1 themselves.
    base_url_suffixes = ("/v1",)
    # Replicate's API hosts: the ones a prediction's urls may name. Outputs
    # (replicate.delivery) are downloaded without the token.
    key_hosts = ("replicate.com", "*.replicate.com")
    default_model = "black-forest-labs/flux-1.1-pro"
    options_model = ReplicateOptions
    models = MODELS

    def description(self, model: sdk.ProviderConfig) -> str:
        return f"{self.entry(model).upstream_model} on Replicate"

    async def run(
        self, job: sdk.ImageJob, entry: Entry, upstream: sdk.Upstream
    ) -> list[sdk.GeneratedImage]:
        headers = {}
        prefer = _prefer(entry.options, self.runtime.settings.limits.upstream_timeout)
        if prefer:
            headers["Prefer"] = prefer
        url = f"{entry.base_url}/v1/models/{entry.upstream_model}/predictions"
        body = {"input": self._input(job, entry.spec)}
        response = await upstream.request("POST", url, json=body, headers=headers)
        if not response.is_success:  # 201 is usual; an older spec says 200
            raise upstream.error(response, job, size_fields=SIZE_FIELDS)
        prediction = _prediction(upstream, response)
        if prediction["status"] not in TERMINAL_STATUSES:
            prediction = await self._poll(job, entry, upstream, prediction, response)
        return await self._images(job, prediction)

    def _input(self, job: sdk.ImageJob, spec: ReplicateModel) -> dict[str, Any]:
        native = sdk.NativeBody(job)
        native.put("prompt", job.request.prompt)
        if job.width and job.height:
            if spec.size_mode == "custom":
                form = f"aspect_ratio=custom, width={job.width}, height={job.height}"
                native.put_size(form, aspect_ratio="custom", width=job.width, height=job.height)
            else:
                ratio = _nearest_ratio(job.width, job.height, spec.aspect_ratios)
                native.put_size(f"aspect_ratio={ratio}", aspect_ratio=ratio)
        if job.seed is not None:
            native.put("seed", job.seed)
        if job.output_format:
            native.put("output_format", job.output_format)
        if job.output_compression is not None and spec.capabilities.accepts_compression:
            native.put("output_compression", job.output_compression)
        native.put_fields()  # a client's own "width" (say) loses to the one from size
        return native.body

    async def _poll(
        self,
        job: sdk.ImageJob,
        entry: Entry,
        upstream: sdk.Upstream,
        prediction: dict[str, Any],
        created: httpx.Response,
    ) -> dict[str, Any]:
        urls = prediction.get("urls")
        urls = urls if isinstance(urls, dict) else {}
        get_url, cancel_url = urls.get("get"), urls.get("cancel")
        if not isinstance(get_url, str):
            raise sdk.UpstreamError(
                "The replicate upstream returned a running prediction without urls.get."
            )
        if isinstance(cancel_url, str):
            await upstream.check_handed_back(cancel_url, "urls.cancel")
        await job.progress(_progress(self.name, prediction))

        async def read(answer: httpx.Response) -> dict[str, Any] | None:
            polled = _prediction(upstream, answer)
            if polled["status"] in TERMINAL_STATUSES:
                return polled
            await job.progress(_progress(self.name, polled))
            return None

        async def cancel() -> None:
            if isinstance(cancel_url, str):  # else the prediction runs to its end
                await upstream.request("POST", cancel_url, handed_back="urls.cancel")

        return await sdk.poll(
            upstream,
            get_url,
            read,
            options=entry.options,
            task="replicate prediction",
            cancel=cancel,
            retry_after=created.headers.get("retry-after"),
        )

    async def _images(
        self, job: sdk.ImageJob, prediction: dict[str, Any]
    ) -> list[sdk.GeneratedImage]:
        status = prediction["status"]
        error = prediction.get("error")
        message = str(error) if error else ""
        if status == "failed":
            if any(marker in message.lower() for marker in MODERATION_MARKERS):
                raise sdk.ContentPolicyViolation(
                    "Your request was rejected by the provider's safety system "
                    f"(replicate: {message})."
                )
            raise sdk.UpstreamError(
                f"The replicate prediction failed: {message or 'no reason given'}"
            )
        if status == "canceled":
            if any(word in message.lower() for word in TIMEOUT_MARKERS):
                raise sdk.UpstreamTimeout(f"The replicate prediction was cancelled: {message}")
            raise sdk.UpstreamError(
                "The replicate prediction was cancelled before it finished.",
                code="upstream_canceled",
            )
        output = prediction.get("output")
        outputs = [output] if isinstance(output, str) else output
        uris = [item for item in outputs or () if isinstance(item, str) and item]
        if not uris:
            removed = " (its data was removed)" if prediction.get("data_removed") else ""
            raise sdk.UpstreamError(
                f"The replicate prediction succeeded without an output{removed}."
            )
        # Some sync answers inline the file as a data: URI.
        return [await self.image_at(uri, seed=job.seed) for uri in uris[: job.n]]


def _prediction(upstream: sdk.Upstream, response: httpx.Response) -> dict[str, Any]:
    payload = upstream.json_object(response, "prediction")
    status = payload.get("status")
    if status not in RUNNING_STATUSES and status not in TERMINAL_STATUSES:
        shown = upstream.redact(json.dumps(status), limit=40)  # redacted before it is cut
        raise sdk.UpstreamError(f"The replicate upstream reported an unknown status {shown}.")
    return payload


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


def _progress(provider: str, prediction: Mapping[str, Any]) -> sdk.Progress:
    logs = prediction.get("logs")
    fraction = None
    if isinstance(logs, str) and (found := _PERCENT.findall(logs)):
        fraction = min(int(found[-1]), 100) / 100
    return sdk.Progress(provider=provider, status=str(prediction.get("status")), fraction=fraction)
