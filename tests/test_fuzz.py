"""Arbitrary JSON at /v1/images/generations: an image, or an OpenAI 4xx, never a 5xx.

A property-based test (hypothesis): bodies are written as raw JSON text, so they can
hold duplicate keys, NaN, lone surrogates, integers of hundreds of digits, deep nesting
and long keys beside the gateway's own parameters with plausible and absurd values. Each
answer is checked: a 2xx carries images that Pillow decodes (hosted links fetched, a
stream's events read), anything else is a 4xx in OpenAI's error shape.

The gateway is the local renderer under tiny limits (tests/in_process.TINY_LOCAL), so
the bodies that are accepted render in milliseconds. The example count is fixed and the
run derandomized, with no example database: CI sees the same examples every time.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flux_proxy import FluxProxy
from tests.images import decode
from tests.in_process import TINY_LOCAL, TINY_N, TINY_SIDE
from tests.openapi import assert_matches
from tests.sse import read_events

MAX_SIDE = TINY_SIDE
MAX_N = TINY_N

# Any code point. Hypothesis' default alphabet is worked out from the UTF-8 codec on
# first use, which takes seconds on a fresh machine (CI); this one costs nothing.
CHARACTERS = st.characters(min_codepoint=0, max_codepoint=0x10FFFF, exclude_categories=[])
HUGE_NUMBERS = [10**400, -(10**400), 2**63, 2**64 + 1, -(2**31), 1e308, -0.0, 5e-324]
scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.sampled_from(HUGE_NUMBERS)
    | st.floats(allow_nan=True, allow_infinity=True)  # NaN and Infinity: Python's json reads them
    | st.text(CHARACTERS, max_size=40)
    | st.sampled_from(["\ud800", "\udfff", "\x00", "💥" * 30, "ä" * 300, " " * 10])
)
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.text(CHARACTERS, max_size=8), inner, max_size=4)
    ),
    max_leaves=5,
)

PLAUSIBLE: dict[str, st.SearchStrategy[Any]] = {
    "model": st.sampled_from(["flux1.1-pro", "flux-pro-1.1", "nope", ""]),
    "prompt": st.sampled_from(["a lighthouse", "x", "", " ", "漢字", "a" * 2000]),
    "n": st.integers(-2, 4),
    "size": st.sampled_from(
        ["32x32", "64x48", "8x8", "1x1", "auto", "1:1", "16:9", "65x2", "0x0", "x", "9" * 30 + "x1"]
    ),
    "aspect_ratio": st.sampled_from(["1:1", "3:2", "custom", "0:0", "1:0", "-1:2", "1e9:1"]),
    "resolution": st.sampled_from(["1K", "0.25", "4K", 0.001, 1e-300, "nan"]),
    "width": st.integers(-1, 80),
    "height": st.integers(-1, 80),
    "response_format": st.sampled_from(["url", "b64_json", "base64"]),
    "output_format": st.sampled_from(["png", "jpeg", "jpg", "gif", "webp", "avif", "bmp"]),
    "output_compression": st.integers(-1, 101),
    "seed": st.integers(-(2**70), 2**70),
    "stream": st.booleans(),
}
# Values the gateway takes under CONFIG's limits: bodies made of these (and of unknown
# keys, which pass through) must get images, and every kind of image answer is reached.
VALID: dict[str, st.SearchStrategy[Any]] = {
    "n": st.integers(1, MAX_N),
    "size": st.sampled_from(["32x32", "64x48", "8x8", "1x64", "auto"]),
    "response_format": st.sampled_from(["url", "b64_json", None]),
    "output_format": st.sampled_from(["png", "jpeg", "jpg", "webp", "gif", "avif", None]),
    "output_compression": st.integers(0, 100),
    "seed": st.integers(-(2**40), 2**40),
    "stream": st.booleans(),
}
keys = (
    st.sampled_from(sorted(PLAUSIBLE))
    | st.text(CHARACTERS, max_size=12)
    # Long keys, built rather than drawn character by character (cheap to generate).
    | st.builds(str.__mul__, st.sampled_from(["k", "é", "\ud800", "💥"]), st.integers(300, 5000))
    | st.sampled_from(["__proto__", "_truncated", "x-flux-proxy-params", "\ud800"])
)


@st.composite
def member(draw: st.DrawFn) -> tuple[str, Any]:
    """One key and value; a known parameter gets a plausible value three times in four."""
    key = draw(st.sampled_from(sorted(PLAUSIBLE)) if draw(st.booleans()) else keys)
    if key in PLAUSIBLE and draw(st.integers(0, 3)):
        return key, draw(PLAUSIBLE[key])
    return key, draw(json_values)


@st.composite
def valid_member(draw: st.DrawFn) -> tuple[str, Any]:
    if draw(st.integers(0, 4)):
        key = draw(st.sampled_from(sorted(VALID)))
        return key, draw(VALID[key])
    return draw(keys.filter(lambda key: key not in PLAUSIBLE)), draw(json_values)


def nested(depth: int) -> str:
    return "[" * depth + "1" + "]" * depth


@st.composite
def raw_bodies(draw: st.DrawFn) -> bytes:
    """A JSON body as text: mostly an object (duplicate keys allowed), sometimes not."""
    kind = draw(st.sampled_from(["object"] * 5 + ["valid"] * 5 + ["deep", "other", "bytes"]))
    if kind == "bytes":
        return draw(st.binary(max_size=64))
    if kind == "other":
        return json.dumps(draw(json_values)).encode()
    members = draw(st.lists(valid_member() if kind == "valid" else member(), max_size=6))
    if kind == "valid" or draw(st.integers(0, 3)):  # the bodies that get far carry a prompt
        members.insert(0, ("prompt", "a small test picture"))
    parts = [json.dumps(key) + ":" + json.dumps(value) for key, value in members]
    if kind == "deep":
        parts.append(
            json.dumps(draw(st.text(CHARACTERS, max_size=4)))
            + ":"
            + nested(draw(st.integers(1, 80)))
        )
    return ("{" + ",".join(parts) + "}").encode()


async def exchange(app: FluxProxy, raw: bytes) -> None:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway.test") as client:
        response = await client.post(
            "/v1/images/generations", content=raw, headers={"content-type": "application/json"}
        )
        assert response.status_code < 500, (raw[:300], response.status_code, response.text[:500])
        if response.status_code >= 300:
            assert 400 <= response.status_code < 500, response.status_code
            assert response.headers["content-type"].startswith("application/json")
            assert_matches(response.json(), "ErrorResponse")
            return
        if response.headers["content-type"].startswith("text/event-stream"):
            events = read_events(response)  # each checked against the spec's schemas
            completed = [e for e in events if e["type"] == "image_generation.completed"]
            assert completed and all(e["type"] != "error" for e in events), events
            images = [decode(_b64(event["b64_json"])) for event in completed]
        else:
            body = response.json()
            assert_matches(body, "ImagesResponse")
            images = [await _image(client, item) for item in body["data"]]
        sent = json.loads(raw)  # as the gateway read it: the last of duplicate keys wins
        assert len(images) == (sent.get("n") or 1)
        for image in images:
            assert 1 <= image.width <= MAX_SIDE and 1 <= image.height <= MAX_SIDE


async def _image(client: httpx.AsyncClient, item: dict[str, Any]) -> Any:
    if "b64_json" in item:
        return decode(_b64(item["b64_json"]))
    hosted = await client.get(item["url"])
    assert hosted.status_code == 200, hosted.text
    return decode(hosted.content)


def _b64(text: str) -> bytes:
    import base64

    return base64.b64decode(text, validate=True)


def test_arbitrary_json_gets_an_image_or_an_openai_4xx_never_a_5xx():
    app = FluxProxy(TINY_LOCAL, environ={})
    answered: list[int] = []
    with asyncio.Runner() as runner:  # one loop for every example: the app is made once

        @settings(
            max_examples=100,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        )
        @given(raw=raw_bodies())
        def check(raw: bytes) -> None:
            runner.run(exchange(app, raw))
            answered.append(1)

        check()
    assert len(answered) >= 50  # hypothesis really ran the examples
