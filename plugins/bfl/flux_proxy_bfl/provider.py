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

Model ``options`` (the shared polling ones, see ``sdk.PollingOptions``):
``poll_interval``, ``poll_max_interval``, ``poll_timeout``, and ``trusted_hosts`` (older
name ``polling_hosts``): hosts a polling URL may name besides ``*.bfl.ai``, ``*.bfl.ml``
and the ``base_url``'s origin. The key travels with every poll, so other hosts are refused.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx
from pydantic import AliasChoices, Field

from flux_proxy import sdk

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
COMMON_FIELDS: dict[str, sdk.FieldRule] = {
    "safety_tolerance": sdk.FieldRule(type="integer", minimum=0, maximum=6),
    "prompt_upsampling": sdk.FieldRule(type="boolean"),
}
# jpeg is BFL's default; BFL has no quality field (the core encodes).
FORMATS: dict[str, Any] = {"output_formats": ("jpeg", "png", "webp"), "accepts_compression": False}


@dataclass(frozen=True, kw_only=True)
class BflModel(sdk.ModelSpec):
    """One BFL endpoint: where it lives, what it makes, and how it is told the size."""

    path: str
    # Set for models that take ``aspect_ratio`` instead of width/height: the ratio text
    # to send for each native size (the model's ``sizes.presets``).
    ratio_of_size: Mapping[tuple[int, int], str] = field(default_factory=dict)


MODELS: dict[str, BflModel] = {
    "flux-pro-1.1": BflModel(
        path="/v1/flux-pro-1.1",
        title="FLUX 1.1 [pro] via Black Forest Labs' API",
        capabilities=sdk.Capabilities(
            sizes=sdk.SizeSupport(**sdk.FLUX_PRO_SIZES),
            max_images_per_call=1,
            fields=COMMON_FIELDS,
            **FORMATS,
        ),
    ),
    "flux-pro-1.1-ultra": BflModel(
        path="/v1/flux-pro-1.1-ultra",
        title="FLUX 1.1 [pro] Ultra via Black Forest Labs' API",
        capabilities=sdk.flux_ultra_capabilities(
            sdk.FLUX_ULTRA_RATIOS,
            max_images_per_call=1,
            fields={
                **COMMON_FIELDS,
                "raw": sdk.FieldRule(type="boolean"),
                "image_prompt_strength": sdk.FieldRule(type="number", minimum=0, maximum=1),
            },
            **FORMATS,
        ),
        ratio_of_size={sdk.FLUX_ULTRA_SIZES[r]: r for r in sdk.FLUX_ULTRA_RATIOS},
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
# BFL's body fields that carry a public parameter under another name (for 422s).
SIZE_FIELDS = frozenset({"width", "height", "aspect_ratio"})


class BflOptions(sdk.PollingOptions):
    """The model entry's ``options`` (checked when the gateway starts)."""

    # ``polling_hosts`` is this plugin's older name for the shared option.
    trusted_hosts: tuple[str, ...] = Field(
        (), validation_alias=AliasChoices("trusted_hosts", "polling_hosts")
    )


Entry = sdk.ModelEntry[BflModel, BflOptions]


class BflProvider(sdk.UpstreamProvider[BflModel, BflOptions]):
    name = "bfl"
    key_env = "BFL_API_KEY"
    key_header = "x-key"
    key_prefix = ""
    base_url = "https://api.bfl.ai"
    # The model paths start with /v1; a base_url written like other providers' (".../v1")
    # must not double it.
    base_url_suffixes = ("/v1",)
    # BFL's regional and per-cluster hosts (api.eu2.bfl.ai, gateway.bfl.ai, ...) and the
    # legacy bfl.ml domain: the polling URLs that get the x-key.
    key_hosts = ("bfl.ai", "*.bfl.ai", "bfl.ml", "*.bfl.ml")
    default_model = "flux-pro-1.1"
    options_model = BflOptions
    models = MODELS

    def check(self, job: sdk.ImageJob) -> None:
        for name, reason in REJECTED_FIELDS.items():
            if name in job.fields:
                raise sdk.InvalidRequest(
                    f"'{name}' cannot be used through this gateway: {reason}.", param=name
                )

    async def run(
        self, job: sdk.ImageJob, entry: Entry, upstream: sdk.Upstream
    ) -> list[sdk.GeneratedImage]:
        url = f"{entry.base_url}{entry.spec.path}"
        response = await upstream.request("POST", url, json=self._body(job, entry.spec))
        if response.status_code != 200:
            raise upstream.error(response, job, size_fields=SIZE_FIELDS)
        polling_url = upstream.json_object(response, "submit").get("polling_url")
        if not isinstance(polling_url, str) or not polling_url:
            raise sdk.UpstreamError("The bfl upstream accepted the task but gave no polling_url.")

        async def read(answer: httpx.Response) -> dict[str, Any] | None:
            return await self._read_poll(job, upstream, answer)

        # BFL has no cancel endpoint: a task given up runs to its end on BFL's side.
        result = await sdk.poll(upstream, polling_url, read, options=entry.options, task="bfl task")
        return [self._image(job, result)]

    def _body(self, job: sdk.ImageJob, model: BflModel) -> dict[str, Any]:
        native = sdk.NativeBody(job)
        native.put("prompt", job.request.prompt)
        if job.width is not None and job.height is not None:
            size = (job.width, job.height)
            if model.ratio_of_size:
                # A size from a config override of the presets still goes as its ratio.
                ratio = model.ratio_of_size.get(size) or _reduced_ratio(*size)
                native.put_size(f"aspect_ratio={ratio}", aspect_ratio=ratio)
            else:
                native.put_size(f"width={size[0]}, height={size[1]}", width=size[0], height=size[1])
        if job.seed is not None:
            native.put("seed", job.seed)
        if job.output_format is not None:
            # Always sent, even BFL's default jpeg: the format layer counts on getting it.
            native.body["output_format"] = job.output_format
        for name in IGNORED_FIELDS.keys() & job.fields.keys():
            job.report.record(name, "ignored", IGNORED_FIELDS[name])
        native.put_fields(skip=IGNORED_FIELDS)
        return native.body

    async def _read_poll(
        self, job: sdk.ImageJob, upstream: sdk.Upstream, response: httpx.Response
    ) -> dict[str, Any] | None:
        payload = upstream.json_object(response, "poll")
        status = payload.get("status")
        if not isinstance(status, str):
            raise sdk.UpstreamError("The bfl upstream answered a poll without a status.")
        fraction = _fraction(payload.get("progress"))
        await job.progress(sdk.Progress(provider=self.name, status=status, fraction=fraction))
        outcome = STATUS_OUTCOMES.get(status, "running")
        if outcome == "ready":
            return payload
        if outcome == "moderated":
            raise _moderated(status, payload.get("details"))
        if outcome == "failed":
            raise _failed(status, payload.get("details"))
        return None

    def _image(self, job: sdk.ImageJob, payload: dict[str, Any]) -> sdk.GeneratedImage:
        result = payload.get("result")
        sample = result.get("sample") if isinstance(result, dict) else None
        if not isinstance(sample, str) or not sample:
            raise sdk.UpstreamError("The bfl upstream reported the task Ready without an image.")
        assert isinstance(result, dict)
        seed = result.get("seed")
        used_prompt = result.get("prompt")
        # With prompt_upsampling BFL rewrites the prompt; that rewrite is OpenAI's revised_prompt.
        revised = (
            used_prompt
            if isinstance(used_prompt, str) and used_prompt and used_prompt != job.request.prompt
            else None
        )
        return sdk.GeneratedImage(
            url=sample,
            seed=seed if isinstance(seed, int) and not isinstance(seed, bool) else job.seed,
            revised_prompt=revised,
        )


def _reduced_ratio(width: int, height: int) -> str:
    divisor = math.gcd(width, height)
    return f"{width // divisor}:{height // divisor}"


def _fraction(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return min(1.0, max(0.0, float(value)))


def _moderated(status: str, details: Any) -> sdk.ContentPolicyViolation:
    reasons = details.get("Moderation Reasons") if isinstance(details, dict) else None
    named = [str(reason) for reason in reasons] if isinstance(reasons, list) else []
    because = f" Moderation reasons: {', '.join(named)}." if named else ""
    what = MODERATION_WHAT.get(status, "the request")
    # The reasons are BFL's text: the provider base redacts the key from the message.
    return sdk.ContentPolicyViolation(
        f"Black Forest Labs' moderation rejected {what} ({status}).{because}"
    )


def _failed(status: str, details: Any) -> sdk.UpstreamError:
    if status == "Task not found":
        return sdk.UpstreamError(
            "The bfl upstream no longer knows the task (status 'Task not found')."
        )
    said = f": {details}" if details else ""
    return sdk.UpstreamError(f"The bfl task failed (status '{status}'){said}")
