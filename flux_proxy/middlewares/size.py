"""Size conversion: ask the provider for a size it makes, return the size asked for."""

from __future__ import annotations

from PIL import Image
from pydantic import BaseModel

from flux_proxy.imaging import FORMAT_OF_MEDIA_TYPE, decode, fit
from flux_proxy.pipeline import CallNext, Layer, derive
from flux_proxy.runtime import Runtime
from flux_proxy.schema import GeneratedImage, Handling, ImageJob, ImageResult
from flux_proxy.sizes import (
    PIXEL_FIELDS,
    SizePlan,
    TargetSize,
    names_no_size,
    pixel_fields,
)


class SizeMiddleware(Layer):
    effects = frozenset({"changes_pixels", "consumes_fields"})
    honours = frozenset({"size", "aspect_ratio", "resolution", *PIXEL_FIELDS})

    def __init__(self, runtime: Runtime, options: BaseModel) -> None:
        limits = runtime.settings.limits
        # The check and the call resolve the same size as admission: the runtime's
        # planner does it once.
        self._sizes = runtime.sizes
        self._runtime = runtime
        self._max_decode = limits.max_upstream_pixels

    def check(self, job: ImageJob) -> None:
        self._plan(job)

    def _plan(self, job: ImageJob) -> SizePlan:
        request = job.request
        return self._sizes.plan(
            size=request.size,
            aspect_ratio=request.aspect_ratio,
            resolution=request.resolution,
            extras=request.extras,
            capabilities=job.target.capabilities,
        )

    async def __call__(self, job: ImageJob, call_next: CallNext) -> ImageResult:
        plan = self._plan(job)
        target, (width, height) = plan.target, plan.native
        self._report(job, target, (width, height))
        fields = job.fields
        request = job.request
        if pixel_fields(request.extras) is not None and names_no_size(request.size):
            # Consumed here: the provider gets the size in its own form instead.
            fields = {k: v for k, v in fields.items() if k not in PIXEL_FIELDS}
            for name in PIXEL_FIELDS:
                job.report.record(name, "converted", f"exact size {target.text}")
        if (width, height, fields) != (job.width, job.height, job.fields):
            job = derive(job, width=width, height=height, fields=fields)
        result = await call_next(job)
        native_fits = (width, height) == (target.width, target.height)
        for image in result.images:
            await self._fit(image, target, assume=native_fits and not job.verify_urls)
        return result

    async def _fit(self, image: GeneratedImage, target: TargetSize, *, assume: bool) -> None:
        """Make ``image`` exactly the target size. With ``assume``, a URL left unchecked
        whose size nobody said is taken to be the (native) size it was asked for."""
        fetcher = self._runtime.fetcher
        if image.pixels is None:
            verify = not assume
            if not await fetcher.ensure_info(image, verify=verify) and image.width is None:
                image.width, image.height, image.assumed = target.width, target.height, True
        current = image.pixels.size if image.pixels is not None else (image.width, image.height)
        if current == (target.width, target.height):
            return
        source: Image.Image | bytes | None = (
            image.pixels if image.pixels is not None else (await fetcher.ensure_data(image)).data
        )
        assert source is not None  # ensure_data gave it bytes
        source_format = FORMAT_OF_MEDIA_TYPE.get(image.media_type or "", "pixels")
        image.pixels = await self._runtime.images.run(
            _fit,
            source,
            target.width,
            target.height,
            self._max_decode,
            pixels=max(image.pixel_count() or 0, target.width * target.height),
            timed_as=("resize", source_format),
        )
        image.data = image.url = image.media_type = None
        image.width, image.height = target.width, target.height

    @staticmethod
    def _report(job: ImageJob, target: TargetSize, native: tuple[int, int]) -> None:
        sent = job.request.model_fields_set
        made = f"{native[0]}x{native[1]}"
        resized = native != (target.width, target.height)
        tail = f"; provider makes {made}, gateway resizes to {target.text}" if resized else ""
        handling: Handling = "emulated" if resized else "converted"
        size = job.request.size
        if "size" in sent and not names_no_size(size):
            if target.exact and not resized:
                job.report.record("size", "passthrough", f"{target.text}")
            else:
                job.report.record("size", handling, f"{target.how} = {target.text}{tail}")
            for other in ("aspect_ratio", "resolution"):
                if other in sent and getattr(job.request, other) is not None:
                    if other == "resolution" and not target.exact:
                        job.report.record(other, "converted", f"tier of {target.text}")
                    else:
                        job.report.record(other, "ignored", "size takes precedence")
            return
        if "size" in sent and size is not None:
            job.report.record("size", "converted", f"auto: {target.how} = {target.text}")
        for param in ("aspect_ratio", "resolution"):
            if param in sent and getattr(job.request, param) is not None:
                job.report.record(param, handling, f"{target.how} = {target.text}{tail}")


def _fit(source: Image.Image | bytes, width: int, height: int, max_decode: int) -> Image.Image:
    image = decode(source, max_decode) if isinstance(source, bytes) else source
    return fit(image, width, height)
