"""The two server processes of the gateway benchmark.

``python -m tests.benchmarks.servers upstream|gateway --fd FD ...`` runs one of them
under uvicorn on a listening socket the parent process bound and passed down:

- ``upstream``: a fast fake OpenAI Images server. ``POST /v1/images/generations``
  answers from bodies built once at start: a 1024x1024 PNG (about 1 MB) as
  ``b64_json``, or, when the request asks for ``response_format: url``, a link
  to the same PNG at ``GET /files/bench.png``.
- ``gateway``: ``flux_proxy.FluxProxy`` with the settings given as JSON.

Each process pins itself to one CPU (``--cpu``, where ``os.sched_setaffinity``
exists) and exits by itself after ``--lifetime`` seconds or as soon as the
process that started it is gone, so nothing outlives the benchmark.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import random
import socket
import threading
import time
from collections.abc import Sequence
from typing import Any

import uvicorn
from PIL import Image, ImageChops
from starlette.types import ASGIApp, Receive, Scope, Send

PNG_SIDE = 1024
PNG_PATH = "/files/bench.png"
GENERATIONS_PATH = "/v1/images/generations"

Headers = list[tuple[bytes, bytes]]


def bench_png() -> bytes:
    """A deterministic 1024x1024 PNG of about 1 MB: gradients with a little noise.

    Flat test pictures compress to a few kilobytes; this one is the size of a
    real generated image, so copying and base64 cost what they cost in production.
    """
    gradient = Image.linear_gradient("L").resize((PNG_SIDE, PNG_SIDE))
    rgb = Image.merge("RGB", (gradient, gradient.rotate(90), gradient.rotate(180)))
    noise_bytes = random.Random(7).randbytes(PNG_SIDE * PNG_SIDE * 3)
    noise = Image.frombytes("RGB", (PNG_SIDE, PNG_SIDE), noise_bytes).point(
        lambda value: value * 3 // 256
    )
    buffer = io.BytesIO()
    ImageChops.add(rgb, noise).save(buffer, "PNG")
    return buffer.getvalue()


class FakeUpstream:
    """A plain ASGI app: no framework, no per-request allocation beyond the request."""

    def __init__(self, png: bytes, base_url: str) -> None:
        self._png = png
        b64 = base64.b64encode(png).decode("ascii")
        self._b64_body = json.dumps({"created": 1, "data": [{"b64_json": b64}]}).encode()
        self._url_body = json.dumps(
            {"created": 1, "data": [{"url": f"{base_url}{PNG_PATH}"}]}
        ).encode()
        self._png_headers = _headers("image/png", len(png))
        self._b64_headers = _headers("application/json", len(self._b64_body))
        self._url_headers = _headers("application/json", len(self._url_body))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        path, method = scope["path"], scope["method"]
        if path == GENERATIONS_PATH and method == "POST":
            request = json.loads(await _read_body(receive) or b"{}")
            if request.get("response_format") == "url":
                await _respond(send, 200, self._url_headers, self._url_body)
            else:
                await _respond(send, 200, self._b64_headers, self._b64_body)
        elif path == PNG_PATH and method == "GET":
            await _respond(send, 200, self._png_headers, self._png)
        elif path == "/health":
            await _respond(send, 200, _headers("text/plain", 2), b"ok")
        else:
            await _respond(send, 404, _headers("text/plain", 9), b"not found")


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


def gateway_settings(upstream_url: str) -> dict[str, Any]:
    """One ``openai`` model whose capabilities make a 1024x1024 PNG request a pass-through.

    ``bench`` declares 1024x1024 as its only native size and PNG as its only format,
    so a 1024x1024 PNG request reaches the upstream unchanged and its bytes come back
    untouched, while ``1000x750`` + ``webp`` makes the gateway resize and transcode.
    """
    return {
        "models": {
            "bench": {
                "provider": "openai",
                "upstream_model": "bench-image",
                "base_url": f"{upstream_url}/v1",
                "capabilities": {
                    "sizes": {"presets": [f"{PNG_SIDE}x{PNG_SIDE}"]},
                    "default_size": f"{PNG_SIDE}x{PNG_SIDE}",
                    "max_images_per_call": 10,
                    "output_formats": ["png"],
                },
                "options": {"response_format": "b64_json"},
            }
        },
        # Each url request hosts a 1 MB image; keep the gateway's memory bounded.
        "store": {"max_bytes": 64 * 1024 * 1024},
    }


def _watchdog(parent: int, lifetime: float) -> None:
    """Exit when the parent is gone or the lifetime is over, whatever else happens."""
    deadline = time.monotonic() + lifetime
    while time.monotonic() < deadline and os.getppid() == parent:
        time.sleep(0.25)
    os._exit(3)


def _pin(cpu: int | None) -> None:
    if cpu is not None and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {cpu})


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("role", choices=["upstream", "gateway"])
    parser.add_argument("--fd", type=int, required=True, help="listening socket to serve")
    parser.add_argument("--cpu", type=int, default=None, help="pin this process to one CPU")
    parser.add_argument("--lifetime", type=float, default=120.0, help="seconds before exiting")
    parser.add_argument("--parent", type=int, default=os.getppid(), help="exit when it is gone")
    parser.add_argument("--settings", default="{}", help="gateway settings as JSON")
    args = parser.parse_args(argv)

    _pin(args.cpu)  # first, so every thread started later inherits it
    threading.Thread(target=_watchdog, args=(args.parent, args.lifetime), daemon=True).start()

    sock = socket.socket(fileno=args.fd)
    host, port = sock.getsockname()[:2]
    app: ASGIApp
    if args.role == "upstream":
        app = FakeUpstream(bench_png(), f"http://{host}:{port}")
    else:
        from flux_proxy import FluxProxy

        app = FluxProxy(json.loads(args.settings), environ={})
    config = uvicorn.Config(
        app, log_level="warning", access_log=False, lifespan="on", timeout_graceful_shutdown=2
    )
    uvicorn.Server(config).run(sockets=[sock])


if __name__ == "__main__":
    main()
