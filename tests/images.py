"""Helpers that look at real image bytes."""

from __future__ import annotations

import base64
import io

from openai.types import Image as SdkImage
from openai.types import ImagesResponse
from PIL import Image

BASE64_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
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


def non_canonical_base64(data: bytes) -> str:
    """Valid base64 of ``data`` that no encoder writes: the last character's unused
    bits are set. Decoders accept it; only text passed on as it is comes back so."""
    text = base64.b64encode(data).decode()
    assert text.endswith("="), "needs padding, so the last character has spare bits"
    last = len(text.rstrip("=")) - 1
    odd = BASE64_ALPHABET[BASE64_ALPHABET.index(text[last]) + 1]
    changed = text[:last] + odd + text[last + 1 :]
    assert base64.b64decode(changed, validate=True) == data
    return changed


def inline_jpeg_base64(jpeg: bytes) -> str:
    """A JPEG as an upstream might inline it, in valid base64 no encoder writes (see
    ``non_canonical_base64``): when its length needs no padding, a zero byte goes after
    the end marker first (encoders pad so too; readers ignore it)."""
    return non_canonical_base64(jpeg + b"\0" * (len(jpeg) % 3 == 0))
