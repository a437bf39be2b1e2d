"""An OpenAI Images server for the tests that records every request it receives.

It makes real images with Pillow at the size asked for, in the format asked for
(PNG by default), and answers ``b64_json`` or ``url`` like OpenAI does. ``fail_with``
makes it answer an error instead, to test the gateway's error mapping; ``truncate``
cuts every image short, as a broken upstream (or connection) would.
"""

from __future__ import annotations

import base64
import secrets
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tests.images import make_image

MEDIA = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}


@dataclass
class RecordingUpstream:
    # Size actually produced, whatever was asked (to test the gateway's resize).
    force_size: tuple[int, int] | None = None
    fail_with: tuple[int, dict[str, Any], dict[str, str]] | None = None
    # Which calls (0-based) fail_with applies to; None: all of them.
    fail_calls: set[int] | None = None
    requests: list[dict[str, Any]] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    files: dict[str, tuple[bytes, str]] = field(default_factory=dict)
    # Base of the image URLs it hands out; default: the address it was reached at.
    url_base: str | None = None
    # Every image made, in order, to check the gateway passes bytes on untouched.
    produced: list[bytes] = field(default_factory=list)
    # Bytes cut off the end of every image sent (as base64 or at its URL): a broken upstream.
    truncate: int = 0
    # Names of the image files downloaded from it, in order.
    downloads: list[str] = field(default_factory=list)

    def app(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/v1/images/generations", self._generate, methods=["POST"]),
                Route("/files/{name}", self._file),
            ]
        )

    async def _generate(self, request: Request) -> Response:
        body = await request.json()
        self.requests.append(body)
        self.headers.append(dict(request.headers))
        failing = self.fail_calls is None or len(self.requests) - 1 in self.fail_calls
        if self.fail_with is not None and failing:
            status, payload, headers = self.fail_with
            return JSONResponse(payload, status_code=status, headers=headers)
        width, height = self.force_size or _size(body.get("size", "1024x1024"))
        fmt = body.get("output_format", "png")
        data = []
        for index in range(body.get("n", 1)):
            image = make_image(fmt, (width, height), colour=(index * 40 % 256, 90, 160))
            self.produced.append(image)
            if self.truncate:
                image = image[: -self.truncate]
            if body.get("response_format") == "url":
                name = secrets.token_hex(8)
                self.files[name] = (image, MEDIA[fmt])
                base = self.url_base or str(request.base_url).rstrip("/")
                data.append({"url": f"{base}/files/{name}"})
            else:
                data.append({"b64_json": base64.b64encode(image).decode()})
        return JSONResponse({"created": 1, "data": data})

    async def _file(self, request: Request) -> Response:
        self.downloads.append(request.path_params["name"])
        image, media_type = self.files[request.path_params["name"]]
        return Response(image, media_type=media_type)


def _size(text: str) -> tuple[int, int]:
    width, _, height = text.partition("x")
    return int(width), int(height)


def gateway_config(
    url: str, answers: str = "url", capabilities: dict[str, Any] | None = None, **store: Any
) -> dict[str, Any]:
    """Gateway settings with one model, ``up``, on the upstream at ``url``, asking it
    for ``answers`` (b64_json or url); ``store`` settings as given."""
    entry: dict[str, Any] = {
        "provider": "openai",
        "base_url": f"{url}/v1",
        "options": {"response_format": answers},
    }
    if capabilities is not None:
        entry["capabilities"] = capabilities
    return {"store": store, "models": {"up": entry}}
