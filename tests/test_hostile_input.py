"""Input built to break parsers, encoders or headers gets a 4xx (or an upstream 502), never a 500.

Each case comes from a review that found it answered 500 or misreported.
"""

from __future__ import annotations

import base64
import io
import json
import os
import struct
import zlib
from typing import Any

import httpx
import pytest
from PIL import Image

from flux_proxy import FluxProxy
from tests.images import assert_image, make_image
from tests.openapi import assert_openai_error

pytestmark = pytest.mark.anyio


async def post(app: FluxProxy, body: object, **kwargs: Any) -> httpx.Response:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway.test") as client:
        if isinstance(body, bytes):
            return await client.post("/v1/images/generations", content=body, **kwargs)
        return await client.post("/v1/images/generations", json=body, **kwargs)


def local() -> FluxProxy:
    return FluxProxy({}, environ={})


@pytest.mark.parametrize(
    "raw",
    [
        b'{"prompt": "x", "extra": ' + b"[" * 5000 + b"]" * 5000 + b"}",
        b'{"prompt": "x", "n": ' + b"1" * 5000 + b"}",
        b'{"prompt": "x", "extra": ' + b"[" * 40 + b"]" * 40 + b"}",
    ],
)
async def test_deep_or_huge_json_is_400(raw):
    assert_openai_error(await post(local(), raw), 400)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("size", "9" * 5000 + "x1"),
        ("size", "1:" + "9" * 400),
        ("aspect_ratio", "1:" + "9" * 400),
        ("aspect_ratio", "9" * 400 + ":1"),
        ("aspect_ratio", "0." + "0" * 300 + "1:1"),
        ("resolution", "1" + "0" * 200 + "K"),
        ("resolution", "9" * 400),
        ("resolution", 10**400),
    ],
)
async def test_absurd_numbers_in_size_fields_are_400(field, value):
    response = await post(local(), {"prompt": "x", field: value})
    assert_openai_error(response, 400)


async def test_too_many_parameters_is_400_and_the_report_header_stays_small():
    app = FluxProxy({"limits": {"max_fields": 64}}, environ={})
    many = {f"p{i}": i for i in range(100)}
    assert_openai_error(await post(app, {"prompt": "x", **many}), 400)

    wide = FluxProxy({"limits": {"max_fields": 400}}, environ={})
    long_names = {f"parameter_with_a_long_name_{i:04d}" + "x" * 100: i for i in range(300)}
    response = await post(wide, {"prompt": "x", "size": "8x8", **long_names})
    assert response.status_code == 200
    header = response.headers["x-flux-proxy-params"]
    assert len(header) <= 8000
    assert json.loads(header)["_truncated"] > 0


@pytest.mark.parametrize("expires", ["%C2%B2", "9" * 5000])
async def test_odd_signed_link_numbers_are_403(expires):
    transport = httpx.ASGITransport(app=local())
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway.test") as client:
        response = await client.get(
            f"/v1/images/files/{'A' * 32}.png?expires={expires}&signature=00"
        )
    assert_openai_error(response, 403)


async def test_size_auto_with_aspect_ratio_reports_the_ratio_as_used():
    response = await post(
        local(),
        {"prompt": "x", "size": "auto", "aspect_ratio": "16:9", "response_format": "b64_json"},
    )
    assert_image(base64.b64decode(response.json()["data"][0]["b64_json"]), "png", (1365, 768))
    report = json.loads(response.headers["x-flux-proxy-params"])
    assert report["aspect_ratio"]["handling"] == "converted"
    assert report["size"]["handling"] == "converted"


def upstream_returning(images: list[bytes]) -> httpx.MockTransport:
    def answer(request: httpx.Request) -> httpx.Response:
        data = [{"b64_json": base64.b64encode(image).decode()} for image in images]
        return httpx.Response(200, json={"data": data})

    return httpx.MockTransport(answer)


def openai_gateway(transport: httpx.MockTransport, **model: object) -> FluxProxy:
    entry = {"provider": "openai", "base_url": "http://upstream.test/v1", **model}
    return FluxProxy({"models": {"m": entry}}, environ={}, transport=transport)


async def test_an_upstream_sending_too_many_images_is_trimmed_to_n():
    app = openai_gateway(upstream_returning([make_image("png", (64, 64))] * 3))
    response = await post(app, {"model": "m", "prompt": "x", "n": 2, "size": "64x64"})
    assert response.status_code == 200
    assert len(response.json()["data"]) == 2


async def test_an_upstream_sending_too_few_images_is_502():
    app = openai_gateway(
        upstream_returning([make_image("png", (64, 64))]),
        capabilities={"max_images_per_call": 4},
    )
    response = await post(app, {"model": "m", "prompt": "x", "n": 3, "size": "64x64"})
    assert "1 of the 3" in assert_openai_error(response, 502)["message"]


def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims a huge size (a decompression bomb's shape)."""
    buffer = io.BytesIO()
    Image.new("L", (1, 1)).save(buffer, "PNG")
    data = bytearray(buffer.getvalue())
    ihdr = struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return bytes(data)


@pytest.mark.parametrize("image", [png_claiming(20000, 20000), b"\x89PNG\r\n\x1a\n" + b"\x00" * 20])
async def test_an_unreadable_upstream_image_is_502(image):
    app = openai_gateway(upstream_returning([image]))
    response = await post(app, {"model": "m", "prompt": "x", "size": "64x64"})
    assert_openai_error(response, 502)


async def test_a_data_uri_above_the_fetch_limit_is_502():
    big = make_image("png", (600, 600))

    def answer(request: httpx.Request) -> httpx.Response:
        uri = "data:image/png;base64," + base64.b64encode(big).decode()
        return httpx.Response(200, json={"data": [{"url": uri}]})

    app = FluxProxy(
        {
            "limits": {"max_fetch_bytes": 1024},
            "models": {"m": {"provider": "openai", "base_url": "http://upstream.test/v1"}},
        },
        environ={},
        transport=httpx.MockTransport(answer),
    )
    assert len(big) > 1024
    response = await post(app, {"model": "m", "prompt": "x", "size": "600x600"})
    assert_openai_error(response, 502)


async def test_a_huge_integer_against_a_ranged_field_is_400():
    rule = {"safety_tolerance": {"type": "integer", "minimum": 1, "maximum": 6}}
    app = openai_gateway(upstream_returning([]), capabilities={"fields": rule})
    response = await post(app, {"model": "m", "prompt": "x", "safety_tolerance": 9 * 10**400})
    assert_openai_error(response, 400, "safety_tolerance")


async def test_an_oversized_upstream_answer_is_refused_while_reading():
    buffer = io.BytesIO()
    Image.frombytes("RGB", (300, 300), os.urandom(300 * 300 * 3)).save(buffer, "PNG")
    image = buffer.getvalue()  # noise: about 270 KB, far above the answer cap below

    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"data": [{"b64_json": base64.b64encode(image).decode()}]})

    app = FluxProxy(
        {
            "limits": {"max_fetch_bytes": 1024},
            "models": {"m": {"provider": "openai", "base_url": "http://upstream.test/v1"}},
        },
        environ={},
        transport=httpx.MockTransport(answer),
    )
    response = await post(app, {"model": "m", "prompt": "x", "size": "600x600"})
    assert "larger than the gateway accepts" in assert_openai_error(response, 502)["message"]


async def test_a_compressed_upstream_answer_is_read_once_decoded():
    image = make_image("png", (64, 64))
    body = json.dumps({"data": [{"b64_json": base64.b64encode(image).decode()}]}).encode()

    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            200,
            content=zlib.compress(body),
            headers={"content-encoding": "deflate", "content-type": "application/json"},
        )

    app = openai_gateway(httpx.MockTransport(answer))
    response = await post(
        app, {"model": "m", "prompt": "x", "size": "64x64", "response_format": "b64_json"}
    )
    assert response.status_code == 200, response.text
    assert base64.b64decode(response.json()["data"][0]["b64_json"]) == image
