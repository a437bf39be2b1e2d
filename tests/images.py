"""Helpers that look at real image bytes."""

from __future__ import annotations

import io

from openai.types import Image as SdkImage
from openai.types import ImagesResponse
from PIL import Image

PILLOW_FORMATS = {"png": "PNG", "jpeg": "JPEG", "gif": "GIF", "webp": "WEBP", "avif": "AVIF"}


def decode(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def assert_image(data: bytes, fmt: str, size: tuple[int, int]) -> Image.Image:
    image = decode(data)
    assert image.format == PILLOW_FORMATS[fmt], f"expected {fmt}, got {image.format}"
    assert image.size == size, f"expected {size}, got {image.size}"
    return image


def make_image(
    fmt: str, size: tuple[int, int], colour: tuple[int, int, int] = (200, 40, 90)
) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, PILLOW_FORMATS[fmt])
    return buffer.getvalue()


def data_of(response: ImagesResponse) -> list[SdkImage]:
    """The images of an SDK response; a response without ``data`` fails the test."""
    assert response.data is not None, f"no data in {response!r}"
    return response.data
