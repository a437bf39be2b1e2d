"""Upstream images are sized from their header before anything decodes them, and a
failed request's memory goes when the request does."""

from __future__ import annotations

import base64
import gc
import io
import struct
import tracemalloc
import zlib
from collections.abc import Awaitable, Callable

import httpx
import pytest
import uvicorn
from PIL import Image
from starlette.types import Receive, Scope, Send

from flux_proxy import FluxProxy
from flux_proxy.errors import UpstreamError
from flux_proxy.imaging import decode
from tests.asgi import asgi_client
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


# An upstream answer above the cap the gateway reads answers with (limits below), or
# one within it whose image is cut short: either way the request fails with a 502
# after holding megabytes, which must go when the request does.
FETCH_CAP = 4 * 1024 * 1024
ANSWER_CAP = FETCH_CAP * 4 // 3 + 65536  # what providers read one image's answer with


def streamed_answer(size: int, prefix: bytes = b"") -> Callable[..., Awaitable[None]]:
    """An upstream app answering any request with a JSON body of ``size`` bytes of
    base64, sent in pieces (it holds no copy of the whole)."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        while (await receive()).get("more_body"):
            pass
        await send({"type": "http.response.start", "status": 200, "headers": []})
        text = base64.b64encode(prefix)
        await send(
            {
                "type": "http.response.body",
                "body": b'{"data":[{"b64_json":"' + text,
                "more_body": True,
            }
        )
        piece = b"A" * 65536
        for _ in range((size - len(text)) // len(piece)):
            await send({"type": "http.response.body", "body": piece, "more_body": True})
        await send({"type": "http.response.body", "body": b'"}]}'})

    return app


@pytest.mark.parametrize(
    ("answer", "refusal"),
    [
        (streamed_answer(ANSWER_CAP * 3), "larger than the gateway accepts"),
        (streamed_answer(ANSWER_CAP - 65536, prefix=make_image("png", (8, 8))), "truncated"),
    ],
    ids=["answer-above-the-cap", "truncated-image-within-it"],
)
@pytest.mark.parametrize("n", [1, 3], ids=["one-call", "fanned-out"])
async def test_a_failed_requests_memory_is_freed_when_it_ends(serve_upstream, answer, refusal, n):
    url = serve_upstream(answer)
    entry = {"provider": "openai", "base_url": f"{url}/v1"}
    app = FluxProxy({"limits": {"max_fetch_bytes": FETCH_CAP}, "models": {"m": entry}}, environ={})
    body = {"model": "m", "prompt": "x", "size": "64x64", "n": n}
    async with asgi_client(app) as client:
        await client.post("/v1/images/generations", json=body)  # the client and pool, warm
        # No collector: what is not freed by reference counting the moment the request
        # ends (a reference cycle) stays, and shows.
        gc.disable()
        tracemalloc.start(FRAMES)
        try:
            before = tracemalloc.take_snapshot()
            response = await client.post("/v1/images/generations", json=body)
            peak = tracemalloc.get_traced_memory()[1]
            after = tracemalloc.take_snapshot()
        finally:
            tracemalloc.stop()
            gc.enable()
    assert refusal in assert_openai_error(response, 502)["message"]
    assert peak > FETCH_CAP  # the measurement does see the answer while it is read
    assert gateway_growth(before, after) < FETCH_CAP // 4


# Deep enough to reach a server thread's own frames from any allocation it makes.
FRAMES = 32
# The server threads in this process (the upstream's, the pool's): not the gateway's.
SERVER_THREADS = [
    tracemalloc.Filter(False, uvicorn.__file__.rsplit("/", 1)[0] + "/*", all_frames=True)
]


def gateway_growth(before: tracemalloc.Snapshot, after: tracemalloc.Snapshot) -> int:
    """Bytes allocated between the snapshots and still held, but by the server threads."""
    stats = after.filter_traces(SERVER_THREADS).compare_to(
        before.filter_traces(SERVER_THREADS), "filename"
    )
    return sum(stat.size_diff for stat in stats)
