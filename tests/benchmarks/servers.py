"""The benchmark's fake OpenAI Images upstream: as fast as a Python server can answer.

``python -m tests.benchmarks.servers --port N [--parent PID]`` serves, under uvicorn:

- ``POST [/single][/delay/MS]/v1/images/generations``: ``n`` copies of a pre-encoded PNG
  of the requested ``size`` (one of ``SIDES``), as ``b64_json`` or, for
  ``response_format: url``, as links to ``GET /files/SIDE.png``. ``/single`` makes one
  image per call whatever ``n`` says (like most real image models); ``/delay/MS`` waits
  that many milliseconds before answering (like a model that takes time to render).
- ``GET /files/SIDE.png``: the PNG itself; ``GET /health``: ``ok``.

Every answer body is built once and kept, so a request costs the parse of its small
JSON and one write. The process exits by itself as soon as ``--parent`` is gone.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import random
import threading
import time
from collections.abc import Sequence

import uvicorn
from PIL import Image, ImageChops
from starlette.types import Receive, Scope, Send

# Square images of 0.25, 1 and 4 megapixels: scenario (f) grows the bytes by 4x twice.
SIDES = (512, 1024, 2048)
DEFAULT_SIDE = 1024
GENERATIONS = "/v1/images/generations"
KEEP_ALIVE_SECONDS = 600  # longer than any run: see main()

Headers = list[tuple[bytes, bytes]]
Answer = tuple[Headers, bytes]


def bench_png(side: int) -> bytes:
    """A deterministic square PNG about as large as a generated one (~1 MB per megapixel).

    Flat test pictures compress to a few kilobytes; gradients with a little noise
    compress like a photograph, so copying and base64 cost what they cost for real.
    """
    gradient = Image.linear_gradient("L").resize((side, side))
    rgb = Image.merge("RGB", (gradient, gradient.rotate(90), gradient.rotate(180)))
    noise_bytes = random.Random(side).randbytes(side * side * 3)
    noise = Image.frombytes("RGB", (side, side), noise_bytes).point(lambda v: v * 3 // 256)
    buffer = io.BytesIO()
    ImageChops.add(rgb, noise).save(buffer, "PNG", compress_level=1)
    return buffer.getvalue()


def file_path(side: int) -> str:
    return f"/files/{side}.png"


class FakeUpstream:
    """A plain ASGI app: no framework, and answers are cached by what decides them."""

    def __init__(self, base_url: str, sides: Sequence[int] = SIDES) -> None:
        self._base_url = base_url
        self._pngs = {side: bench_png(side) for side in sides}
        self._b64 = {side: base64.b64encode(png).decode() for side, png in self._pngs.items()}
        self._answers: dict[tuple[int, str, int], Answer] = {}
        self._files = {
            file_path(s): (_headers("image/png", len(p)), p) for s, p in self._pngs.items()
        }

    def answer(self, side: int, response_format: str, n: int) -> Answer:
        key = (side, response_format, n)
        if key not in self._answers:
            if response_format == "url":
                entry = {"url": self._base_url + file_path(side)}
            else:
                entry = {"b64_json": self._b64[side]}
            body = json.dumps({"created": 1, "data": [entry] * n}).encode()
            self._answers[key] = (_headers("application/json", len(body)), body)
        return self._answers[key]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        path: str = scope["path"]
        if scope["method"] == "POST" and path.endswith(GENERATIONS):
            await self._generate(path.removesuffix(GENERATIONS), receive, send)
        elif path in self._files:
            await _respond(send, 200, *self._files[path])
        elif path == "/health":
            await _respond(send, 200, _headers("text/plain", 2), b"ok")
        else:
            await _respond(send, 404, _headers("text/plain", 9), b"not found")

    async def _generate(self, prefix: str, receive: Receive, send: Send) -> None:
        """``prefix`` is the mode: ``""``, ``/single``, ``/delay/MS`` or both."""
        request = json.loads(await _read_body(receive) or b"{}")
        side = int(str(request.get("size", f"{DEFAULT_SIDE}x")).split("x")[0])
        if side not in self._pngs:
            body = b'{"error": {"message": "unsupported size", "type": "invalid_request_error"}}'
            await _respond(send, 400, _headers("application/json", len(body)), body)
            return
        parts = prefix.strip("/").split("/")
        n = 1 if "single" in parts else int(request.get("n", 1))
        if "delay" in parts:
            await asyncio.sleep(int(parts[parts.index("delay") + 1]) / 1000)
        await _respond(send, 200, *self.answer(side, request.get("response_format", "url"), n))


def _headers(media_type: str, length: int) -> Headers:
    return [(b"content-type", media_type.encode()), (b"content-length", str(length).encode())]


async def _read_body(receive: Receive) -> bytes:
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


async def _respond(send: Send, status: int, headers: Headers, body: bytes) -> None:
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


def _watchdog(parent: int) -> None:
    """Exit when the process that started this one is gone, whatever else happens."""
    while os.getppid() == parent:
        time.sleep(0.25)
    os._exit(3)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--parent", type=int, default=os.getppid(), help="exit when it is gone")
    parser.add_argument("--sides", default=",".join(map(str, SIDES)), help="image sides to serve")
    args = parser.parse_args(argv)
    threading.Thread(target=_watchdog, args=(args.parent,), daemon=True).start()
    sides = [int(side) for side in args.sides.split(",")]
    app = FakeUpstream(f"http://127.0.0.1:{args.port}", sides)
    # Kept-alive connections stay open across the run's idle gaps: with uvicorn's 5 s
    # default, a proxy whose pool sat idle about that long (between scenarios) reused
    # connections this server was closing, and a bare forwarder's (f) row lost 540 of
    # its 960 requests to that race, not to anything it measures.
    uvicorn.run(
        app,
        host="127.0.0.1",
        port=args.port,
        log_level="warning",
        access_log=False,
        timeout_keep_alive=KEEP_ALIVE_SECONDS,
    )


if __name__ == "__main__":
    main()
