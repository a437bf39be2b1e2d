"""Format, size and completeness read from an image's first and last bytes, as bytes or
as base64 text, checked against what Pillow makes and decodes."""

from __future__ import annotations

import base64
import io
from typing import Any

import pytest
from PIL import Image

from flux_proxy import b64
from flux_proxy.errors import UpstreamError
from flux_proxy.fetch import read_header
from flux_proxy.peek import ImageBytes, is_complete, pixel_size, sniff_format
from flux_proxy.schema import GeneratedImage
from tests.images import PILLOW_FORMATS, decode

SIZE = (321, 123)
# The pixel cap read_header applies; the images here are far below it.
MAX_PIXELS = 4096 * 4096
# (format, Pillow save options, mode): every way the gateway's encoders and common
# upstreams write them.
CASES: list[tuple[str, dict[str, Any], str]] = [
    ("png", {}, "RGB"),
    ("png", {}, "RGBA"),
    ("jpeg", {}, "RGB"),
    ("jpeg", {"progressive": True}, "RGB"),
    # A long EXIF segment and an ICC profile before the frame header.
    ("jpeg", {"exif": b"Exif\x00\x00" + bytes(40_000), "icc_profile": bytes(3000)}, "RGB"),
    ("gif", {}, "RGB"),
    ("webp", {}, "RGB"),
    ("webp", {}, "RGBA"),
    ("webp", {"lossless": True}, "RGB"),
    ("avif", {}, "RGB"),
    ("avif", {}, "RGBA"),
]


def encoded(fmt: str, options: dict[str, Any], mode: str) -> bytes:
    buffer = io.BytesIO()
    noise = Image.effect_noise(SIZE, 60).convert(mode)
    noise.save(buffer, PILLOW_FORMATS[fmt], **options)
    return buffer.getvalue()


def held(data: bytes, as_text: bool) -> ImageBytes:
    return ImageBytes(text=base64.b64encode(data)) if as_text else ImageBytes(data=data)


@pytest.mark.parametrize("as_text", [False, True], ids=["bytes", "base64"])
@pytest.mark.parametrize(("fmt", "options", "mode"), CASES)
def test_header_and_end_agree_with_pillow(fmt, options, mode, as_text):
    data = encoded(fmt, options, mode)
    assert decode(data).size == SIZE  # what Pillow reads from the whole file
    image = held(data, as_text)
    assert image.length == len(data)
    assert sniff_format(image.read(0, 12)) == fmt
    assert pixel_size(image, fmt) == SIZE
    assert is_complete(image, fmt)
    for cut in (1, 2, 5, len(data) // 2):
        assert not is_complete(held(data[:-cut], as_text), fmt), cut


@pytest.mark.parametrize(("fmt", "options", "mode"), CASES)
def test_read_header_refuses_an_image_above_the_pixel_cap_before_decoding(fmt, options, mode):
    cap = SIZE[0] * SIZE[1]
    image = GeneratedImage(b64=base64.b64encode(encoded(fmt, options, mode)))
    with pytest.raises(UpstreamError) as refused:
        read_header(image, cap - 1)
    assert refused.value.code == "upstream_image_too_large"
    fits = GeneratedImage(b64=base64.b64encode(encoded(fmt, options, mode)))
    read_header(fits, cap)
    assert (fits.width, fits.height) == SIZE


def test_reading_base64_decodes_only_the_groups_it_needs():
    data = encoded("png", {}, "RGB")
    text = base64.b64encode(data)
    # Broken in the middle: what is read at the ends does not touch it.
    middle = len(text) // 2 // 4 * 4
    broken = text[:middle] + b"****" + text[middle + 4 :]
    image = ImageBytes(text=broken)
    assert pixel_size(image, "png") == SIZE
    assert is_complete(image, "png")
    assert image.read(100, 130) == data[100:130]


def test_read_header_refuses_a_truncated_image_and_names_it():
    data = encoded("webp", {}, "RGB")
    with pytest.raises(UpstreamError, match="truncated webp image"):
        read_header(GeneratedImage(b64=base64.b64encode(data[:-10])), MAX_PIXELS)


def test_read_header_sets_format_and_size_and_leaves_base64_undecoded():
    data = encoded("jpeg", {"exif": b"Exif\x00\x00" + bytes(40_000)}, "RGB")
    image = GeneratedImage(b64=base64.b64encode(data))
    read_header(image, MAX_PIXELS)
    assert (image.media_type, image.width, image.height) == ("image/jpeg", *SIZE)
    assert image.data is None


def test_an_unusual_header_is_left_to_pillow():
    data = bytearray(encoded("png", {}, "RGB"))
    data[12:16] = b"IHDX"  # not where this reading looks, and Pillow refuses it too
    assert pixel_size(ImageBytes(data=bytes(data)), "png") is None
    with pytest.raises(UpstreamError, match="unreadable png"):
        read_header(GeneratedImage(data=bytes(data)), MAX_PIXELS)


def test_invalid_base64_is_refused_before_it_is_passed_on():
    image = GeneratedImage(b64=b"iVBORw0K" + b'"}' + b"AAAA")
    with pytest.raises(UpstreamError, match="base64 is invalid"):
        image.checked_b64()


def test_assigning_bytes_drops_the_upstreams_text():
    image = GeneratedImage(b64=base64.b64encode(b"old"))
    image.data = b"new"
    assert image.b64 is None and image.data == b"new"


@pytest.mark.parametrize("at", ["first", "boundary", "after", "last"])
@pytest.mark.parametrize("fault", [b'"', b"\\", b"\n", b"="])
def test_base64_check_finds_a_fault_anywhere_in_a_long_text(at: str, fault: bytes) -> None:
    """A text of several pieces as the check reads them: a quote, backslash, line break
    or padding anywhere but the end fails it, at a piece's edge as well as inside one."""
    text = bytearray(base64.b64encode(bytes(range(256)) * 8000))  # ~2.7 MB of text
    assert len(text) > 4 * b64.CHECK_CHUNK
    where = {
        "first": 0,
        "boundary": b64.CHECK_CHUNK - 1,
        "after": b64.CHECK_CHUNK,
        "last": len(text) - 5,
    }[at]
    b64.check(bytes(text))  # valid as made
    text[where] = fault[0]
    with pytest.raises(b64.InvalidBase64):
        b64.check(bytes(text))


def test_base64_check_refuses_padding_that_ends_a_piece_not_the_text() -> None:
    """Each piece valid on its own, padded at a piece's end: not one strict base64 text."""
    head = base64.b64encode(b"x" * (b64.CHECK_CHUNK // 4 * 3 - 2))
    assert len(head) == b64.CHECK_CHUNK and head.endswith(b"==")
    with pytest.raises(b64.InvalidBase64):
        b64.check(head + base64.b64encode(b"abc"))
    b64.check(head)  # padding that ends the text is fine
