"""Upstream images are sized from their header before anything decodes them, and a
failed request's memory goes when the request does."""

from __future__ import annotations

import base64
import io
import struct
import zlib

import httpx
import pytest
from PIL import Image

from flux_proxy import FluxProxy
from flux_proxy.errors import UpstreamError
from flux_proxy.imaging import decode
from tests.images import make_image
from tests.in_process import generate
from tests.openapi import assert_openai_error

pytestmark = pytest.mark.anyio


def png_bomb(width: int, height: int) -> bytes:
    """A real, complete PNG of ``width x height`` black pixels: a few kilobytes of
    zlib that decode to width x height bytes (a decompression bomb's shape)."""
    rows = zlib.compress(b"\x00" * ((width + 1) * height), 9)
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")
    )


def upstream_returning(image: bytes) -> httpx.MockTransport:
    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"data": [{"b64_json": base64.b64encode(image).decode()}]})

    return httpx.MockTransport(answer)


def gateway(transport: httpx.AsyncBaseTransport, **limits: object) -> FluxProxy:
    entry = {"provider": "openai", "base_url": "http://upstream.test/v1"}
    return FluxProxy({"limits": limits, "models": {"m": entry}}, environ={}, transport=transport)


@pytest.mark.parametrize("response_format", ["b64_json", "url"])
@pytest.mark.parametrize("size", ["64x64", "1024x1024"])  # resized, and passed on as it is
async def test_an_upstream_image_above_the_pixel_cap_is_502_from_its_header(size, response_format):
    bomb = png_bomb(3000, 3000)  # 9 MP; the cap below is twice 1024 x 1024
    assert len(bomb) < 20_000
    app = gateway(upstream_returning(bomb), max_pixels=1024 * 1024)
    response = await generate(
        app, model="m", prompt="x", size=size, response_format=response_format
    )
    error = assert_openai_error(response, 502)
    assert error["code"] == "upstream_image_too_large"
    assert "3000x3000" in error["message"]


async def test_an_upstream_image_within_the_cap_is_served():
    image = make_image("png", (1500, 1000))  # above max_pixels, within twice it
    app = gateway(upstream_returning(image), max_pixels=1024 * 1024)
    response = await generate(
        app, model="m", prompt="x", size="600x400", response_format="b64_json"
    )
    assert response.status_code == 200, response.text
    decoded = Image.open(io.BytesIO(base64.b64decode(response.json()["data"][0]["b64_json"])))
    assert (decoded.format, decoded.size) == ("PNG", (600, 400))


def test_decode_bounds_each_call_not_the_process():
    before = Image.MAX_IMAGE_PIXELS
    image = make_image("png", (300, 200))
    with pytest.raises(UpstreamError) as refused:
        decode(image, max_pixels=300 * 200 - 1)
    assert refused.value.code == "upstream_image_too_large"
    assert decode(image, max_pixels=300 * 200).size == (300, 200)
    assert decode(image).size == (300, 200)  # no bound given: Pillow's own
    after = Image.MAX_IMAGE_PIXELS
    assert after == before
