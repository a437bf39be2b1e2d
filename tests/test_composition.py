"""Every stack a user can configure either works or is refused at start-up.

The ordering rules are restated here, independently of flux_proxy.composition,
and every ordered subset of the built-in layers (326 stacks) is built: each one
is refused exactly when the rules say, with a message naming the layers, and
each accepted one answers url and b64_json requests for an exact size, a
transcoded format, n > 1 and an unknown field correctly, or refuses a
parameter whose layer is missing with a 400 that names it.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from itertools import permutations
from typing import Any

import httpx
import pytest

from flux_proxy import FluxProxy
from flux_proxy.config import ConfigError
from tests.images import assert_image
from tests.openapi import assert_matches, assert_openai_error

LAYERS = ("response_format", "output_format", "size", "fanout", "passthrough")
# Which parameter of the probe request each layer carries out.
PARAM_OF_LAYER = {
    "output_format": "output_format",
    "size": "size",
    "fanout": "n",
    "passthrough": "style",
}
# outer must come before inner, whenever both are in the stack.
MUST_WRAP = (
    ("response_format", "output_format"),
    ("response_format", "size"),
    ("output_format", "size"),
)

CONFIG: dict[str, Any] = {
    "models": {
        # Multiples of 16 only: 40x30 is made at 48x32 and resized by the gateway.
        # The local renderer makes png, jpeg and webp: gif is a transcode.
        "m": {
            "provider": "local",
            "capabilities": {"default_size": "64x48", "sizes": {"multiple_of": 16}},
        }
    }
}
PROBE: dict[str, Any] = {
    "model": "m",
    "prompt": "a lighthouse",
    "size": "40x30",
    "output_format": "gif",
    "n": 2,
    "style": "vivid",
}


def ordered_subsets() -> Iterator[tuple[str, ...]]:
    for length in range(len(LAYERS) + 1):
        yield from permutations(LAYERS, length)


def expected_refusal(stack: tuple[str, ...]) -> tuple[str, ...] | None:
    """The layers a refusal must name, or None where the stack must work."""
    if "response_format" not in stack:
        return ("response_format",)
    for outer, inner in MUST_WRAP:
        if outer in stack and inner in stack and stack.index(inner) < stack.index(outer):
            return (outer, inner)
    return None


STACKS = list(ordered_subsets())


def test_there_are_326_ordered_subsets() -> None:
    assert len(STACKS) == 326


@pytest.mark.anyio
@pytest.mark.parametrize("stack", STACKS, ids=lambda stack: "+".join(stack) or "empty")
async def test_every_stack_works_or_is_refused_at_start_up(stack: tuple[str, ...]) -> None:
    refusal = expected_refusal(stack)
    if refusal is not None:
        with pytest.raises(ConfigError) as refused:
            FluxProxy({**CONFIG, "middlewares": list(stack)}, environ={}, plugins=())
        message = str(refused.value)
        assert message.startswith("middlewares"), message
        for name in refusal:
            assert f"'{name}'" in message, message
        return

    app = FluxProxy({**CONFIG, "middlewares": list(stack)}, environ={})
    missing = {param for layer, param in PARAM_OF_LAYER.items() if layer not in stack}
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://gw.test") as http:
        for response_format in ("url", "b64_json"):
            dropped = await _send_until_answered(
                http, {**PROBE, "response_format": response_format}, missing
            )
            assert dropped == missing, (response_format, dropped)


async def _send_until_answered(
    http: httpx.AsyncClient, payload: dict[str, Any], missing: set[str]
) -> set[str]:
    """Send, dropping each parameter the stack refuses, until an answer comes back;
    check that answer against what is still asked. Returns the refused parameters."""
    refused: set[str] = set()
    while True:
        response = await http.post("/v1/images/generations", json=payload)
        if response.status_code == 200:
            await _check_answer(http, response, payload)
            return refused
        error = assert_openai_error(response, 400)
        param = error["param"]
        assert param in missing and param not in refused, error
        assert "does not honour" in error["message"], error
        refused.add(param)
        payload = {key: value for key, value in payload.items() if key != param}


async def _check_answer(
    http: httpx.AsyncClient, response: httpx.Response, payload: dict[str, Any]
) -> None:
    body = response.json()
    assert_matches(body, "ImagesResponse")
    fmt = payload.get("output_format", "png")
    size = (40, 30) if "size" in payload else (64, 48)
    assert len(body["data"]) == payload.get("n", 1)
    for item in body["data"]:
        if payload["response_format"] == "url":
            assert "b64_json" not in item
            hosted = await http.get(item["url"])
            assert hosted.status_code == 200
            assert hosted.headers["content-type"] == f"image/{fmt}"
            data = hosted.content
        else:
            assert "url" not in item
            data = base64.b64decode(item["b64_json"])
        assert_image(data, fmt, size)
    # gif is not in ImagesResponse's enum: the body names no format rather than a wrong one.
    assert body.get("output_format") in (None, "png")
    report = json.loads(response.headers["x-flux-proxy-params"])
    for param in payload:
        assert param in report, (param, report)
    if "style" in payload:
        assert report["style"]["handling"] in ("passthrough", "ignored"), report
