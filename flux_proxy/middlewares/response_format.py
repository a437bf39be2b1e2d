"""response_format: deliver every image as a URL or as base64, whatever the upstream gave."""

from __future__ import annotations

from pydantic import BaseModel

from flux_proxy.imaging import FORMAT_OF_MEDIA_TYPE, encode
from flux_proxy.pipeline import CallNext, Layer
from flux_proxy.runtime import Runtime
from flux_proxy.schema import GeneratedImage, ImageJob, ImageResult


class ResponseFormatMiddleware(Layer):
    effects = frozenset({"delivers"})
    honours = frozenset({"response_format"})

    def __init__(self, runtime: Runtime, options: BaseModel) -> None:
        self._runtime = runtime
        self._default = runtime.settings.defaults.response_format
        self._keep_upstream_urls = runtime.settings.store.return_upstream_urls

    async def __call__(self, job: ImageJob, call_next: CallNext) -> ImageResult:
        wanted = job.request.response_format or self._default
        result = await call_next(job)
        hosted = kept = 0
        for image in result.images:
            # A streamed completed event carries the image's bytes whatever the format.
            keep = self._keep_upstream_urls and not job.request.stream
            if keep and wanted == "url" and _is_web_url(image.url):
                kept += 1
                continue
            await self._with_bytes(image)
            if wanted == "url":
                image.url = await self._host(image, job.public_url)
                hosted += 1
            else:
                image.url = None
        if "response_format" in job.request.model_fields_set:
            if wanted == "b64_json":
                detail = "gateway returns the image bytes base64-encoded"
            elif kept and not hosted:
                detail = "upstream URLs returned as they are"
            else:
                detail = "gateway hosts the images at signed, expiring URLs"
            job.report.record("response_format", "emulated", detail)
        return result

    async def _with_bytes(self, image: GeneratedImage) -> None:
        if image.pixels is not None:  # changed but not encoded: no format layer in the stack
            image.data = await self._runtime.images.run(encode, image.pixels, "png", None)
            image.pixels, image.media_type = None, "image/png"
        await self._runtime.fetcher.ensure_data(image)

    async def _host(self, image: GeneratedImage, public_url: str) -> str:
        assert image.data is not None and image.media_type is not None
        fmt = FORMAT_OF_MEDIA_TYPE[image.media_type]
        name = await self._runtime.store.put(image.data, fmt)
        return f"{public_url}/images/files/{name}?{self._runtime.signer.query(name)}"


def _is_web_url(url: str | None) -> bool:
    return url is not None and url.startswith(("https://", "http://"))
