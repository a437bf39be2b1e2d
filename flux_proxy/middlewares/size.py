"""Size conversion: ask the provider for a size it makes, return the size asked for."""

from __future__ import annotations

from dataclasses import replace

from PIL import Image

from flux_proxy.imaging import decode, fit
from flux_proxy.pipeline import CallNext
from flux_proxy.runtime import Runtime
from flux_proxy.schema import GeneratedImage, Handling, ImageJob, ImageResult
from flux_proxy.sizes import SizeLimits, TargetSize, native_size, resolve_target

SIZE_PARAMS = ("size", "aspect_ratio", "resolution")


class SizeMiddleware:
    def __init__(self, runtime: Runtime) -> None:
        limits = runtime.settings.limits
        self._limits = SizeLimits(max_side=limits.max_side, max_pixels=limits.max_pixels)
        self._runtime = runtime

    def check(self, job: ImageJob) -> None:
        self._target(job)

    def _target(self, job: ImageJob) -> TargetSize:
        request = job.request
        return resolve_target(
            size=request.size,
            aspect_ratio=request.aspect_ratio,
            resolution=request.resolution,
            capabilities=job.route.capabilities,
            limits=self._limits,
        )

    async def __call__(self, job: ImageJob, call_next: CallNext) -> ImageResult:
        target = self._target(job)
        width, height = native_size(target.width, target.height, job.route.capabilities.sizes)
        self._report(job, target, (width, height))
        result = await call_next(replace(job, width=width, height=height))
        for image in result.images:
            await self._fit(image, target)
        return result

    async def _fit(self, image: GeneratedImage, target: TargetSize) -> None:
        if image.pixels is None and (image.width is None or image.height is None):
            await self._runtime.fetcher.ensure_data(image)
        current = image.pixels.size if image.pixels is not None else (image.width, image.height)
        if current == (target.width, target.height):
            return
        source: Image.Image | bytes | None = (
            image.pixels if image.pixels is not None else image.data
        )
        if source is None:
            source = (await self._runtime.fetcher.ensure_data(image)).data
        image.pixels = await self._runtime.images.run(_fit, source, target.width, target.height)
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
        if "size" in sent and size is not None and size.strip().lower() != "auto":
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


def _fit(source: Image.Image | bytes, width: int, height: int) -> Image.Image:
    image = decode(source) if isinstance(source, bytes) else source
    return fit(image, width, height)
