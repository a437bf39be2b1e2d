"""Output format: ask the provider for the best native format, transcode the rest."""

from __future__ import annotations

from dataclasses import dataclass

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from flux_proxy.capabilities import LOSSY_FORMATS, Capabilities
from flux_proxy.imaging import MEDIA_TYPES, decode, encode
from flux_proxy.pipeline import CallNext, Layer, derive
from flux_proxy.runtime import Runtime
from flux_proxy.schema import GeneratedImage, ImageJob, ImageResult

# When the gateway will re-encode, it asks for the least lossy format on offer.
LOSSLESS_PREFERENCE = ("png", "webp", "avif", "jpeg", "gif")


@dataclass(frozen=True, slots=True)
class FormatPlan:
    target: str
    compression: int | None  # OpenAI meaning: 0-100, 100 = best; None = not asked
    native: str
    native_compression: int | None
    # The provider's bytes cannot be kept even when they are already `target`.
    reencode: bool


def plan_format(target: str, compression: int | None, capabilities: Capabilities) -> FormatPlan:
    lossy = target in LOSSY_FORMATS
    custom_quality = lossy and compression is not None and compression < 100
    if target in capabilities.output_formats and (
        not custom_quality or capabilities.accepts_compression
    ):
        native_compression = compression if lossy and capabilities.accepts_compression else None
        return FormatPlan(target, compression, target, native_compression, reencode=False)
    native = next(
        (fmt for fmt in LOSSLESS_PREFERENCE if fmt in capabilities.output_formats),
        capabilities.output_formats[0],
    )
    return FormatPlan(target, compression, native, None, reencode=custom_quality)


class OutputFormatOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    # Quality (OpenAI's output_compression scale, 100 = best) for lossy formats when
    # the client sends no output_compression; unset: the encoder's or provider's own.
    quality: int | None = Field(None, ge=0, le=100)


class OutputFormatMiddleware(Layer):
    options_model = OutputFormatOptions
    effects = frozenset({"encodes"})
    honours = frozenset({"output_format", "output_compression"})

    def __init__(self, runtime: Runtime, options: OutputFormatOptions) -> None:
        self._runtime = runtime
        self._default = runtime.settings.defaults.output_format
        self._quality = options.quality
        self._max_decode = runtime.settings.limits.max_upstream_pixels

    async def __call__(self, job: ImageJob, call_next: CallNext) -> ImageResult:
        request = job.request
        compression = request.output_compression
        plan = plan_format(
            request.target_format or self._default,
            self._quality if compression is None else compression,
            job.target.capabilities,
        )
        self._report(job, plan)
        native = (plan.native, plan.native_compression)
        if (job.output_format, job.output_compression) != native:
            job = derive(job, output_format=native[0], output_compression=native[1])
        result = await call_next(job)
        for image in result.images:
            await self._finish(image, plan, job.verify_urls)
        result.output_format = plan.target
        return result

    async def _finish(self, image: GeneratedImage, plan: FormatPlan, verify: bool) -> None:
        fetcher = self._runtime.fetcher
        keep = plan.native == plan.target and not plan.reencode
        if image.pixels is None:
            if not await fetcher.ensure_info(image, verify=verify) and keep:
                # A URL passed on unchecked: taken to be the format it was asked in.
                image.media_type, image.assumed = MEDIA_TYPES[plan.target], True
                return
            if image.media_type == MEDIA_TYPES[plan.target] and not plan.reencode:
                return  # already what was asked for: pass it on untouched
            await fetcher.ensure_data(image)
        source: Image.Image | bytes | None = (
            image.pixels if image.pixels is not None else image.data
        )
        assert source is not None  # ensure_data gave it bytes
        image.data = await self._runtime.images.run(
            _transcode,
            source,
            plan.target,
            plan.compression,
            self._max_decode,
            pixels=image.pixel_count(),
            fmt=plan.target,
            timed_as=("transcode", plan.target),
        )
        image.pixels = image.url = None
        image.media_type = MEDIA_TYPES[plan.target]

    @staticmethod
    def _report(job: ImageJob, plan: FormatPlan) -> None:
        sent = job.request.model_fields_set
        if "output_format" in sent and job.request.output_format is not None:
            if plan.native == plan.target and not plan.reencode:
                job.report.record("output_format", "passthrough", f"{plan.target} (native)")
            else:
                job.report.record(
                    "output_format",
                    "emulated",
                    f"provider makes {plan.native}, gateway encodes {plan.target}",
                )
        if "output_compression" in sent and plan.compression is not None:
            if plan.target not in LOSSY_FORMATS:
                job.report.record(
                    "output_compression", "ignored", f"{plan.target} is not a lossy format"
                )
            elif plan.native_compression is not None:
                job.report.record("output_compression", "passthrough", "applied by the provider")
            else:
                job.report.record(
                    "output_compression",
                    "emulated",
                    f"gateway encodes {plan.target} at quality {plan.compression}",
                )


def _transcode(
    source: Image.Image | bytes, fmt: str, compression: int | None, max_decode: int
) -> bytes:
    image = decode(source, max_decode) if isinstance(source, bytes) else source
    return encode(image, fmt, compression)
