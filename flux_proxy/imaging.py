"""Pillow work: sniffing, decoding, fitting and encoding images.

The functions here are blocking; :class:`ImageWorker` runs them off the event
loop on a bounded number of threads in two lanes (light and heavy work), so a
burst of large images can neither stall every other request nor exhaust memory.
"""

from __future__ import annotations

import asyncio
import contextvars
import io
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from PIL import Image, ImageOps
from prometheus_client import Histogram

from flux_proxy.errors import UpstreamError
from flux_proxy.peek import sniff_format

T = TypeVar("T")

MEDIA_TYPES: dict[str, str] = {
    "png": "image/png",
    "jpeg": "image/jpeg",
    "gif": "image/gif",
    "webp": "image/webp",
    "avif": "image/avif",
}
FORMAT_OF_MEDIA_TYPE: dict[str, str] = {v: k for k, v in MEDIA_TYPES.items()}
EXTENSIONS: dict[str, str] = {
    "png": "png",
    "jpeg": "jpg",
    "gif": "gif",
    "webp": "webp",
    "avif": "avif",
}
# Formats whose encoder is far slower per pixel than the rest (AVIF at quality 100: ~1 s
# of CPU per megapixel for a smooth picture, 1.6 for noise, against 0.05-0.4 for PNG and
# 0.13-0.3 for WebP, measured with Pillow 13): always heavy work, with its own budget.
SLOW_ENCODERS = frozenset({"avif"})
PILLOW_NAMES: dict[str, str] = {
    "png": "PNG",
    "jpeg": "JPEG",
    "gif": "GIF",
    "webp": "WEBP",
    "avif": "AVIF",
}


def check_pixels(width: int, height: int, max_pixels: int) -> None:
    """Refuse (502) an upstream image larger than the gateway decodes, from its header.

    A few hundred kilobytes of PNG can claim 20,000 x 20,000 pixels; decoded, that is
    1.6 GB. The size is read before anything is decoded."""
    if width * height > max_pixels:
        raise UpstreamError(
            f"The upstream returned a {width}x{height} image, larger than the "
            f"{max_pixels} pixels this gateway decodes.",
            code="upstream_image_too_large",
        )


def probe(data: bytes) -> tuple[str, int, int]:
    """Format and pixel size, reading only the header."""
    fmt = sniff_format(data)
    if fmt is None:
        raise UpstreamError("The upstream returned data that is not a supported image.")
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
    except Exception as exc:  # Pillow raises many kinds for bad input; all mean the same here
        raise UpstreamError(f"The upstream returned an unreadable {fmt} image.") from exc
    return fmt, width, height


def decode(data: bytes, max_pixels: int | None = None) -> Image.Image:
    """Decode ``data``, refusing first (from the header) an image above ``max_pixels``.

    The bound is this call's, not Pillow's process-wide ``MAX_IMAGE_PIXELS`` (left as
    Pillow sets it, an outer bound for every caller): two gateways in one process, or
    a plugin decoding with its own bound, do not change each other's."""
    try:
        image = Image.open(io.BytesIO(data))
    except Exception as exc:  # Pillow raises many kinds for bad input; all mean the same here
        raise UpstreamError("The upstream returned an image the gateway cannot decode.") from exc
    if max_pixels is not None:
        check_pixels(image.width, image.height, max_pixels)
    try:
        image.load()
    except Exception as exc:  # as above
        raise UpstreamError("The upstream returned an image the gateway cannot decode.") from exc
    return image


def fit(image: Image.Image, width: int, height: int) -> Image.Image:
    """Scale to cover ``width x height`` and crop the overflow evenly from both sides."""
    if image.size == (width, height):
        return image
    return ImageOps.fit(image, (width, height), method=Image.Resampling.LANCZOS)


def encode(image: Image.Image, fmt: str, compression: int | None) -> bytes:
    """Encode as ``fmt``. ``compression`` follows OpenAI: 0-100, 100 = best quality."""
    quality = 100 if compression is None else compression
    options: dict[str, object] = {}
    if fmt == "jpeg":
        image = _flatten(image)
        options = {"quality": max(quality, 1), "optimize": quality < 100}
    elif fmt in ("webp", "avif"):
        image = image if image.mode in ("RGB", "RGBA") else image.convert("RGBA")
        options = {"quality": quality}
    elif fmt == "gif":
        image = _flatten(image).quantize(colors=256, method=Image.Quantize.MEDIANCUT)
    elif fmt == "png" and image.mode not in ("RGB", "RGBA", "L", "LA", "P"):
        image = image.convert("RGBA")
    buffer = io.BytesIO()
    image.save(buffer, PILLOW_NAMES[fmt], **options)
    return buffer.getvalue()


def _flatten(image: Image.Image) -> Image.Image:
    """RGB on white: for formats without (good) alpha."""
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB")


class ImageWorker:
    """Runs blocking image work in threads, in two lanes with their own threads.

    Light work (an image of at most ``light_pixels``, not encoded as a slow format)
    runs on ``light_workers`` threads, the rest on ``workers``: a 64x64 resize never
    waits for a thread behind 4096x4096 AVIF encodes. Work whose size the caller does
    not give (``pixels=None``, a plugin's, say) is taken to be heavy.

    A caller that stops waiting (its request's deadline passed, its client left) gets
    its cancellation at once, but a job already running keeps its thread to the end:
    Pillow cannot be interrupted, and the lane's bound must count it until it is done.
    A job not yet started is dropped.

    With ``seconds``, a job given ``timed_as=(operation, format)`` has its own time (in
    its thread, not its wait for one) counted there: ``("transcode", "webp")``,
    ``("resize", "png")``.
    """

    def __init__(
        self,
        workers: int,
        light_workers: int = 1,
        light_pixels: int = 0,
        seconds: Histogram | None = None,
    ) -> None:
        self._seconds = seconds
        self._heavy = ThreadPoolExecutor(workers, thread_name_prefix="flux-proxy-images")
        self._light = ThreadPoolExecutor(light_workers, thread_name_prefix="flux-proxy-light")
        self._light_pixels = light_pixels

    async def run(
        self,
        function: Callable[..., T],
        *args: object,
        pixels: int | None = None,
        fmt: str | None = None,
        timed_as: tuple[str, str] | None = None,
    ) -> T:
        """``function(*args)`` in a thread of the lane that ``pixels`` (of the larger
        image the job handles) and ``fmt`` (the format it encodes, if any) pick."""
        light = pixels is not None and pixels <= self._light_pixels and fmt not in SLOW_ENCODERS
        lane = self._light if light else self._heavy
        # The caller's context goes along (as anyio's threads carry it: a request id for
        # the log, say); wrap_future: cancelling the await drops a job not yet started.
        if timed_as is not None and self._seconds is not None:
            function = _timed(function, self._seconds.labels(*timed_as))
        job = lane.submit(contextvars.copy_context().run, function, *args)
        return await asyncio.wrap_future(job)


def _timed(function: Callable[..., T], timer: Histogram) -> Callable[..., T]:
    def timed(*args: object) -> T:
        started = time.perf_counter()
        try:
            return function(*args)
        finally:
            timer.observe(time.perf_counter() - started)

    return timed
