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

Model ``options`` (all optional): ``mode`` (``"queue"`` or ``"sync"``), ``logs``
(poll with ``?logs=1`` and log fal's run log lines at debug level), and the shared
polling ones (``sdk.PollingOptions``: ``poll_interval``, ``poll_max_interval``,
``poll_timeout``, ``trusted_hosts``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import httpx

from flux_proxy import sdk

logger = logging.getLogger("flux_proxy.fal")

DEFAULT_HOSTS: dict[str, str] = {"queue": "https://queue.fal.run", "sync": "https://fal.run"}

# fal's named image sizes (fal toolkit); a size equal to one is sent by name.
IMAGE_SIZE_PRESETS: dict[tuple[int, int], str] = {
    (1024, 1024): "square_hd",
    (512, 512): "square",
    (768, 1024): "portrait_4_3",
    (576, 1024): "portrait_16_9",
    (1024, 768): "landscape_4_3",
    (1024, 576): "landscape_16_9",
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
# Up to four images per call, jpeg or png (no webp at fal).
PER_CALL: dict[str, Any] = {"max_images_per_call": 4, "output_formats": ("jpeg", "png")}


@dataclass(frozen=True, kw_only=True)
class FalModel(sdk.ModelSpec):
    """What one fal model accepts, as data."""

    # The body field carrying the size, and the names fal has for sizes.
    size_field: Literal["image_size", "aspect_ratio"]
    size_names: Mapping[tuple[int, int], str]
    # Whether a size without a name may be sent as {"width", "height"}.
    custom_sizes: bool


MODELS: dict[str, FalModel] = {
    "fal-ai/flux-pro/v1.1": FalModel(
        title="FLUX 1.1 [pro] on fal.ai",
        capabilities=sdk.Capabilities(
            # fal accepts custom sizes up to 14142; whether it enforces FLUX's own
            # 256-1440 / multiple-of-32 rule is unknown, so only sizes FLUX accepts are asked for.
            sizes=sdk.SizeSupport(**sdk.FLUX_PRO_SIZES),
            fields=COMMON_FIELDS,
            **PER_CALL,
        ),
        size_field="image_size",
        size_names=IMAGE_SIZE_PRESETS,
        custom_sizes=True,
    ),
    "fal-ai/flux-pro/v1.1-ultra": FalModel(
        title="FLUX 1.1 [pro] ultra on fal.ai",
        capabilities=sdk.flux_ultra_capabilities(
            sdk.FLUX_ULTRA_RATIOS,
            fields={
                **COMMON_FIELDS,
                "raw": {"type": "boolean"},
                "image_prompt_strength": {"type": "number", "minimum": 0, "maximum": 1},
            },
            **PER_CALL,
        ),
        size_field="aspect_ratio",
        size_names={sdk.FLUX_ULTRA_SIZES[r]: r for r in sdk.FLUX_ULTRA_RATIOS},
        custom_sizes=False,
    ),
}

# Statuses of fal's queue, in fal's spelling.
WAITING = frozenset({"IN_QUEUE", "IN_PROGRESS"})
COMPLETED = "COMPLETED"

# Error types in a fal ``detail`` list that are fal's fault, not the request's.
UPSTREAM_FAULTS: dict[str, type[sdk.UpstreamError]] = {
    "internal_server_error": sdk.UpstreamError,
    "downstream_service_error": sdk.UpstreamError,
    "downstream_service_unavailable": sdk.UpstreamError,
    "generation_timeout": sdk.UpstreamTimeout,
}


class FalOptions(sdk.PollingOptions):
    mode: Literal["queue", "sync"] = "queue"
    logs: bool = False


Entry = sdk.ModelEntry[FalModel, FalOptions]


class FalProvider(sdk.UpstreamProvider[FalModel, FalOptions]):
    name = "fal"
    key_env = "FAL_KEY"
    key_prefix = "Key "
    base_url = DEFAULT_HOSTS["queue"]
    # fal's API hosts (queue.fal.run, fal.run, the backup queue.falrun.com): the ones a
    # queue ticket may name. Result files (fal.media) are downloaded without the key.
    key_hosts = ("fal.run", "*.fal.run", "falrun.com", "*.falrun.com")
    default_model = "fal-ai/flux-pro/v1.1"
    options_model = FalOptions
    models = MODELS

    def default_base_url(self, options: FalOptions) -> str:
        return DEFAULT_HOSTS[options.mode]  # the sync API lives on another host

    def description(self, model: sdk.ProviderConfig) -> str:
        entry = self.entry(model)
        return f"{entry.spec.title} ({entry.upstream_model}, {entry.options.mode} API)"

    async def run(
        self, job: sdk.ImageJob, entry: Entry, upstream: sdk.Upstream
    ) -> list[sdk.GeneratedImage]:
        url = f"{entry.base_url}/{entry.upstream_model}"
        body = self._body(job, entry.spec)
        if entry.options.mode == "sync":
            response = await upstream.request("POST", url, json=body)
            if response.status_code != 200:
                raise self._error(job, entry, upstream, response)
            output = upstream.json(response, "output")
        else:
            output = await self._run_queued(job, entry, upstream, url, body)
        return await self._images(job, output)

    # --- request body -------------------------------------------------------------

    def _body(self, job: sdk.ImageJob, model: FalModel) -> dict[str, Any]:
        native = sdk.NativeBody(job)
        native.put("prompt", job.request.prompt)
        self._put_size(job, model, native)
        native.put("n", job.n)  # as num_images; sent even at fal's default of 1, to be explicit
        if job.seed is not None:
            native.put("seed", job.seed)
        if job.output_format is not None:
            native.put("output_format", job.output_format)
        # A client sending fal's own name (image_size, num_images, ...) does not beat the
        # public parameter the gateway already turned into that field.
        native.put_fields()
        return native.body

    def _put_size(self, job: sdk.ImageJob, model: FalModel, native: sdk.NativeBody) -> None:
        if job.width is None or job.height is None:
            return  # no size layer in the stack: fal's default size
        size = (job.width, job.height)
        value: str | dict[str, int]
        if size in model.size_names:
            value = model.size_names[size]
        elif model.custom_sizes:
            value = {"width": job.width, "height": job.height}
        else:
            raise sdk.InvalidRequest(
                f"This model's provider makes only {', '.join(model.size_names.values())} "
                f"sizes; {job.width}x{job.height} is not one of them.",
                param="size",
            )
        form = f"{model.size_field}={json.dumps(value, separators=(',', ':'))}"
        native.put_size(form, **{model.size_field: value})

    # --- the queue ------------------------------------------------------------------

    async def _run_queued(
        self,
        job: sdk.ImageJob,
        entry: Entry,
        upstream: sdk.Upstream,
        url: str,
        body: dict[str, Any],
    ) -> Any:
        response = await upstream.request("POST", url, json=body)
        if response.status_code not in (200, 201, 202):
            raise self._error(job, entry, upstream, response)
        ticket = upstream.json_object(response, "queue ticket")
        urls = {name: ticket.get(name) for name in ("status_url", "response_url", "cancel_url")}
        for name, handed_back in urls.items():
            if not isinstance(handed_back, str) or not handed_back:
                raise sdk.UpstreamError(f"fal's queue ticket has no {name}.")
            # All three get the key: a ticket naming a foreign host is refused before any use.
            await upstream.check_handed_back(handed_back, name)
        status_url, response_url, cancel_url = (str(url) for url in urls.values())
        await self._report(job, ticket)
        seen_logs = 0

        async def read(answer: httpx.Response) -> dict[str, Any] | None:
            nonlocal seen_logs
            status = upstream.json_object(answer, "status")
            state = status.get("status")
            if not isinstance(state, str):
                raise sdk.UpstreamError("fal answered a status poll without a status.")
            await self._report(job, status)
            seen_logs = _log_lines(status, seen_logs, upstream)
            if state == COMPLETED:
                return status
            if state not in WAITING:
                raise sdk.UpstreamError(f"fal reported an unknown status {state!r}.")
            return None

        async def cancel() -> None:
            answer = await upstream.request("PUT", cancel_url, handed_back="cancel_url")
            logger.info("cancelled fal request (HTTP %d)", answer.status_code)

        final = await sdk.poll(
            upstream,
            status_url,
            read,
            options=entry.options,
            task="fal request",
            cancel=cancel,
            retry_after=response.headers.get("retry-after"),
            params={"logs": "1"} if entry.options.logs else None,
        )
        result = await upstream.request("GET", response_url, handed_back="response_url")
        if result.status_code != 200:
            # A failed run's result URL carries fal's real error (status and detail).
            raise self._error(job, entry, upstream, result)
        if final.get("error"):
            error_type = final.get("error_type")
            kind = error_type if isinstance(error_type, str) else "run_failed"
            raise _infrastructure_error(kind, str(final["error"]))
        return upstream.json(result, "output")

    async def _report(self, job: sdk.ImageJob, status: dict[str, Any]) -> None:
        position = status.get("queue_position")
        state = str(status.get("status", "IN_QUEUE"))
        await job.progress(
            sdk.Progress(
                provider=self.name,
                status=state,
                queue_position=position if isinstance(position, int) else None,
                fraction=1.0 if state == COMPLETED else None,
            )
        )

    # --- output -------------------------------------------------------------------

    async def _images(self, job: sdk.ImageJob, output: Any) -> list[sdk.GeneratedImage]:
        items = output.get("images") if isinstance(output, dict) else None
        if not isinstance(items, list) or not items:
            raise sdk.UpstreamError("fal answered without any images.")
        flags = output.get("has_nsfw_concepts")
        checker_on = job.fields.get("enable_safety_checker") is not False
        if checker_on and isinstance(flags, list) and any(flag is True for flag in flags):
            # fal's safety checker blanks flagged images. A request gets n usable images or
            # an error, never fewer or blank ones; with the checker off the flags are advisory.
            flagged = sum(flag is True for flag in flags)
            raise sdk.ContentPolicyViolation(
                f"fal's safety checker flagged {flagged} of {len(items)} generated image(s) "
                "as not safe for work; no images are returned."
            )
        if len(items) < job.n:
            raise sdk.UpstreamError(f"fal returned {len(items)} image(s) where {job.n} were asked.")
        images = []
        for item in items[: job.n]:
            url = item.get("url") if isinstance(item, dict) else None
            if not isinstance(url, str):
                raise sdk.UpstreamError("fal returned an image entry without a URL.")
            sides = (_int(item.get("width")), _int(item.get("height")))
            # With sync_mode the url is a data: URI.
            images.append(await self.image_at(url, _int(output.get("seed")), *sides))
        return images

    # --- errors -------------------------------------------------------------------

    def _error(
        self, job: sdk.ImageJob, entry: Entry, upstream: sdk.Upstream, response: httpx.Response
    ) -> sdk.GatewayError:
        if response.status_code in (401, 402, 403, 429):
            return upstream.error(response)
        try:
            body = response.json()
        except (ValueError, UnicodeDecodeError):
            body = None
        detail = body.get("detail") if isinstance(body, dict) else None
        items = [i for i in detail if isinstance(i, dict)] if isinstance(detail, list) else []
        error_type = response.headers.get("x-fal-error-type") or (
            body.get("error_type") if isinstance(body, dict) else None
        )
        if isinstance(error_type, str) and error_type:
            return _infrastructure_error(error_type, detail if isinstance(detail, str) else None)
        for item in items:
            fault = UPSTREAM_FAULTS.get(str(item.get("type")))
            if fault is not None:
                return fault(f"fal failed: {_item_text(item)} ({item.get('type')}).")
        return upstream.error(response, job, size_fields=frozenset({entry.spec.size_field}))


def _item_text(item: dict[str, Any]) -> str:
    loc = item.get("loc")
    where = ".".join(str(part) for part in loc[1:]) if isinstance(loc, list) else ""
    message = str(item.get("msg", "invalid input"))
    return f"{where}: {message}" if where else message


def _infrastructure_error(error_type: str, detail: str | None) -> sdk.UpstreamError:
    text = detail or error_type
    if error_type.endswith("_timeout"):
        return sdk.UpstreamTimeout(f"fal timed out ({error_type}): {text}")
    return sdk.UpstreamError(f"fal failed ({error_type}): {text}")


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _log_lines(status: dict[str, Any], seen: int, upstream: sdk.Upstream) -> int:
    logs = status.get("logs")
    if not isinstance(logs, list):
        return seen
    for entry in logs[seen:]:
        message = entry.get("message") if isinstance(entry, dict) else entry
        logger.debug("fal: %s", upstream.redact(str(message)))
    return max(seen, len(logs))


__all__ = ["MODELS", "FalModel", "FalOptions", "FalProvider"]
