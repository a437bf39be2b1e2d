"""A real ``flux-proxy serve`` process, fed an oversized answer and an image bomb, keeps
its peak memory (VmHWM, from /proc) within a bound far below what either would cost."""

from __future__ import annotations

import base64
import json
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import yaml
from starlette.types import Receive, Scope, Send

from tests.openapi import assert_openai_error
from tests.servers import ServeUpstream, free_port
from tests.test_cli import Server, spawn, wait_until_serving  # noqa: F401 - spawn is a fixture

pytestmark = pytest.mark.skipif(
    not Path("/proc/self/status").exists(), reason="reads VmHWM from /proc"
)

FETCH_CAP = 8 * 1024 * 1024  # limits.max_fetch_bytes: an answer is read up to ~11 MiB
MAX_PIXELS = 1024 * 1024  # limits.max_pixels: images above 2 MP are refused unread
BOMB = (6000, 6000)  # 36 MP of RGB: ~100 KB of PNG, 108 MB decoded
OVERSIZED = 256 * 1024 * 1024  # what the upstream would send, if it were let
# What the process may grow by over the warm-up: the answer it reads up to the cap,
# twice over for the JSON around it, and room for the allocator.
BOUND = 4 * FETCH_CAP


def png_bomb(width: int, height: int) -> bytes:
    """A valid RGB PNG of black pixels, built without compressing its megabytes: a
    full-flushed deflate block of 100 zero rows compresses alike every time, so it is
    made once and repeated."""
    rows = bytes((1 + 3 * width) * 100)  # each row: filter byte 0, then zeros
    deflate = zlib.compressobj(9)
    block = deflate.compress(rows) + deflate.flush(zlib.Z_FULL_FLUSH)
    header, body = block[:2], block[2:]
    length = len(rows) * (height // 100)
    adler = (length % 65521) << 16 | 1  # Adler-32 of zeros: a stays 1, b counts bytes
    data = header + body * (height // 100) + b"\x03\x00" + struct.pack(">I", adler)

    def chunk(kind: bytes, content: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + content))
        return struct.pack(">I", len(content)) + kind + content + crc

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


async def upstream(scope: Scope, receive: Receive, send: Send) -> None:
    """OpenAI Images: the prompt picks the answer; every one arrives in pieces."""
    if scope["type"] != "http":
        return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    prompt = json.loads(body)["prompt"]
    await send({"type": "http.response.start", "status": 200, "headers": []})
    if prompt == "oversized":
        await send(
            {"type": "http.response.body", "body": b'{"data":[{"b64_json":"', "more_body": True}
        )
        piece = b"A" * (1024 * 1024)
        for _ in range(OVERSIZED // len(piece)):
            await send({"type": "http.response.body", "body": piece, "more_body": True})
        await send({"type": "http.response.body", "body": b'"}]}'})
        return
    image = png_bomb(*BOMB) if prompt == "bomb" else png_bomb(100, 100)
    text = base64.b64encode(image)
    await send({"type": "http.response.body", "body": b'{"data":[{"b64_json":"' + text + b'"}]}'})


def peak_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM in /proc status")


def test_oversized_answers_and_image_bombs_keep_peak_memory_bounded(
    spawn: Callable[..., Server],  # noqa: F811 - the fixture imported above
    serve_upstream: ServeUpstream,
    tmp_path: Path,
) -> None:
    url = serve_upstream(upstream)
    config = {
        "limits": {"max_fetch_bytes": FETCH_CAP, "max_pixels": MAX_PIXELS},
        # Every answer here fails: the breaker would skip the upstream after five.
        "breaker": {"enabled": False},
        "models": {"up": {"provider": "openai", "base_url": f"{url}/v1"}},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    port = free_port()
    server = spawn("serve", "--port", str(port), "--config", str(path))
    base = f"http://127.0.0.1:{port}"
    wait_until_serving(server, base)

    def ask(prompt: str, size: str) -> httpx.Response:
        body = {"model": "up", "prompt": prompt, "size": size, "response_format": "b64_json"}
        return httpx.post(f"{base}/v1/images/generations", json=body, timeout=60)

    # Warm: imports, the pool, Pillow, one real decode and resize.
    assert ask("small", "64x64").status_code == 200
    warm = peak_kib(server.process.pid)
    for _ in range(2):
        refused = assert_openai_error(ask("oversized", "64x64"), 502)
        assert "larger than the gateway accepts" in refused["message"]
        for size in ("64x64", "1024x1024"):  # resized, and passed on as it is
            bomb = assert_openai_error(ask("bomb", size), 502)
            assert bomb["code"] == "upstream_image_too_large"
    grown = (peak_kib(server.process.pid) - warm) * 1024
    assert grown < BOUND, f"peak memory grew by {grown / 2**20:.0f} MiB"
