"""response_format: deliver every image as a URL or as base64, whatever the upstream gave.

Where nothing changed an image, what the upstream sent goes on as it is: its base64
text into a ``b64_json`` answer, and (with ``store.return_upstream_urls``) its URL
into a ``url`` answer, downloaded first only with ``store.verify_upstream_urls``.
"""

from __future__ import annotations

import asyncio

from pydantic import BaseModel

from flux_proxy.errors import InvalidRequest, StoreUnavailable
from flux_proxy.imaging import FORMAT_OF_MEDIA_TYPE, encode
from flux_proxy.pipeline import CallNext, Layer, derive
from flux_proxy.runtime import Runtime
from flux_proxy.schema import GeneratedImage, Handling, ImageJob, ImageResult


class ResponseFormatMiddleware(Layer):
    effects = frozenset({"delivers"})
    honours = frozenset({"response_format"})

    def __init__(self, runtime: Runtime, options: BaseModel) -> None:
        self._runtime = runtime
        self._default = runtime.settings.defaults.response_format
        self._keep_upstream_urls = runtime.settings.store.return_upstream_urls
        self._verify_upstream_urls = runtime.settings.store.verify_upstream_urls

    async def __call__(self, job: ImageJob, call_next: CallNext) -> ImageResult:
        wanted = job.request.response_format or self._default
        # A streamed completed event carries the image's bytes whatever the format.
        keep = self._keep_upstream_urls and wanted == "url" and not job.request.stream
        public_url = job.public_url
        if wanted == "url" and public_url is None:
            # Before the upstream is paid for: no link could carry the answer.
            raise InvalidRequest(
                "The gateway builds no image link for this request's Host: it is not one "
                "of server.allowed_hosts, and server.public_url is unset. Ask for "
                "response_format 'b64_json', or reach the gateway by a host it serves.",
                code="untrusted_host",
            )
        if wanted == "url" and not keep and not job.request.stream:
            # The store failed a moment ago: no provider is paid for an image it cannot keep.
            problem = self._runtime.store.known_problem()
            if problem is not None:
                raise StoreUnavailable(problem)
        verify = not keep or self._verify_upstream_urls
        result = await call_next(
            job if job.verify_urls == verify else derive(job, verify_urls=verify)
        )
        kept = 0
        unchecked: list[GeneratedImage] = []
        to_host: list[GeneratedImage] = []
        for image in result.images:
            if keep and _is_web_url(image.url):
                if not await self._runtime.fetcher.ensure_info(image, verify=verify):
                    unchecked.append(image)
                kept += 1
                continue
            if wanted == "url":
                await self._with_bytes(image)
                to_host.append(image)
            else:
                await self._with_text(image)
                image.url = None
        if to_host:
            # All at once: n images wait for one store round trip, not n in a row.
            assert public_url is not None  # a url answer without one: refused before the call
            links = await asyncio.gather(*(self._host(image, public_url) for image in to_host))
            for image, link in zip(to_host, links, strict=True):
                image.url = link
        hosted = len(to_host)
        if unchecked:
            # Said whether or not the client sent response_format: the answer holds
            # links to images the gateway has not seen.
            job.report.record(
                "response_format",
                "passthrough",
                "upstream URLs returned as they are, not downloaded or checked "
                f"(store.verify_upstream_urls is off): {_assumed(unchecked)}",
            )
        elif "response_format" in job.request.model_fields_set:
            handling: Handling = "emulated"
            if wanted == "b64_json":
                detail = "gateway returns the image bytes base64-encoded"
            elif kept and not hosted:
                # The upstream's own links, untouched: nothing was emulated.
                handling, detail = "passthrough", "upstream URLs returned as they are"
            else:
                detail = "gateway hosts the images at signed, expiring URLs"
            job.report.record("response_format", handling, detail)
        return result

    async def _encode_pixels(self, image: GeneratedImage) -> None:
        if image.pixels is not None:  # changed but not encoded: no format layer in the stack
            image.data = await self._runtime.images.run(
                encode,
                image.pixels,
                "png",
                None,
                pixels=image.pixel_count(),
                fmt="png",
                timed_as=("transcode", "png"),
            )
            image.pixels, image.media_type = None, "image/png"

    async def _with_bytes(self, image: GeneratedImage) -> None:
        await self._encode_pixels(image)
        await self._runtime.fetcher.ensure_data(image)

    async def _with_text(self, image: GeneratedImage) -> None:
        """What a b64_json answer needs: the upstream's text stays undecoded."""
        await self._encode_pixels(image)
        if image.b64 is None:
            await self._runtime.fetcher.ensure_data(image)
        else:
            await self._runtime.fetcher.ensure_info(image)
            image.checked_b64()  # here, not at render: a bad answer can still fail over

    async def _host(self, image: GeneratedImage, public_url: str) -> str:
        assert image.data is not None and image.media_type is not None
        fmt = FORMAT_OF_MEDIA_TYPE[image.media_type]
        store = self._runtime.store
        name = await store.put(image.data, fmt)
        direct = store.direct_url(name)  # a presigned object URL, say
        if direct is not None:
            return direct
        return f"{public_url}/images/files/{name}?{self._runtime.signer.query(name)}"


def _is_web_url(url: str | None) -> bool:
    return url is not None and url.startswith(("https://", "http://"))


def _assumed(images: list[GeneratedImage]) -> str:
    """What the unchecked images were taken to be (what the provider was asked for)."""
    seen: list[str] = []
    for image in images:
        fmt = FORMAT_OF_MEDIA_TYPE.get(image.media_type or "")
        size = f"{image.width}x{image.height}" if image.width and image.height else None
        what = " ".join(part for part in (fmt, size) if part)
        text = f"assumed {what}" if what else "format and size not known"
        if text not in seen:
            seen.append(text)
    return "; ".join(seen)
