"""output_format and output_compression: the bytes are really what was asked for."""

from __future__ import annotations

import base64
import json
from typing import Any
from urllib.parse import urlsplit

import httpx
import openai
import pytest

from tests.images import assert_image, data_of
from tests.servers import ServeUpstream
from tests.upstream_openai import RecordingUpstream


def generate_b64(client: openai.OpenAI, **params: Any) -> tuple[bytes, dict[str, Any]]:
    raw = client.images.with_raw_response.generate(
        model="flux1.1-pro", prompt="a harbour at dusk", response_format="b64_json", **params
    )
    data = base64.b64decode(raw.parse().data[0].b64_json or "")
    return data, json.loads(raw.headers["x-flux-proxy-params"])


@pytest.mark.parametrize("fmt", ["png", "jpeg", "gif", "webp", "avif"])
def test_each_format_is_really_that_format(client: openai.OpenAI, fmt: str) -> None:
    data, report = generate_b64(client, size="320x200", output_format=fmt)
    assert_image(data, fmt, (320, 200))
    native = fmt in ("png", "jpeg", "webp")  # what the local renderer makes itself
    assert report["output_format"]["handling"] == ("passthrough" if native else "emulated")


def test_jpg_is_an_alias_of_jpeg(client: openai.OpenAI) -> None:
    data, _ = generate_b64(client, size="64x64", extra_body={"output_format": "jpg"})
    assert_image(data, "jpeg", (64, 64))


def test_url_response_serves_the_right_media_type(client: openai.OpenAI) -> None:
    result = client.images.generate(
        model="flux1.1-pro",
        prompt="x",
        size="100x80",
        output_format="avif",  # the gateway's, not in the SDK's enum
    )  # type: ignore[call-overload]
    download = httpx.get(result.data[0].url or "")
    assert download.headers["content-type"] == "image/avif"
    assert urlsplit(result.data[0].url or "").path.endswith(".avif")
    assert_image(download.content, "avif", (100, 80))


@pytest.mark.parametrize("fmt", ["jpeg", "webp", "avif"])
def test_lower_compression_means_smaller_files(client: openai.OpenAI, fmt: str) -> None:
    sizes = []
    for compression in (100, 50, 10):
        data, report = generate_b64(
            client,
            size="512x512",
            output_format=fmt,
            output_compression=compression,
            extra_body={"seed": 3},
        )
        assert_image(data, fmt, (512, 512))
        sizes.append(len(data))
    assert sizes[0] > sizes[1] > sizes[2], sizes
    assert report["output_compression"]["handling"] in ("passthrough", "emulated")


def test_compression_on_lossless_format_is_reported_ignored(client: openai.OpenAI) -> None:
    data, report = generate_b64(client, size="64x64", output_format="png", output_compression=20)
    assert_image(data, "png", (64, 64))
    assert report["output_compression"]["handling"] == "ignored"


def test_default_format_is_png(client: openai.OpenAI) -> None:
    data, _ = generate_b64(client, size="64x64")
    assert_image(data, "png", (64, 64))


@pytest.fixture
def upstream(serve_upstream: ServeUpstream) -> tuple[RecordingUpstream, str]:
    recorder = RecordingUpstream()
    return recorder, serve_upstream(recorder.app())


def openai_model(url: str, **capabilities: Any) -> dict[str, Any]:
    return {
        "models": {
            "up": {
                "provider": "openai",
                "base_url": f"{url}/v1",
                "options": {"response_format": "b64_json"},
                "capabilities": capabilities,
            }
        }
    }


def test_native_format_and_size_pass_through_untouched(upstream, start_gateway):
    recorder, url = upstream
    gateway = start_gateway(openai_model(url, output_formats=["png", "jpeg"]))
    client = openai.OpenAI(base_url=f"{gateway}/v1", api_key="x", max_retries=0)
    for fmt in ("png", "jpeg"):
        result = client.images.generate(
            model="up", prompt="x", size="300x200", output_format=fmt, response_format="b64_json"
        )
        # Byte for byte what the upstream made: no decode, no re-encode.
        assert base64.b64decode(data_of(result)[0].b64_json or "") == recorder.produced[-1]
    assert "output_format" not in recorder.requests[0]  # png is the upstream's default
    assert recorder.requests[1]["output_format"] == "jpeg"


def test_gateway_asks_for_lossless_when_it_will_reencode(upstream, start_gateway):
    recorder, url = upstream
    gateway = start_gateway(openai_model(url, output_formats=["jpeg", "png"]))
    client = openai.OpenAI(base_url=f"{gateway}/v1", api_key="x", max_retries=0)
    result = client.images.generate(
        model="up", prompt="x", size="300x200", output_format="webp", response_format="b64_json"
    )
    assert_image(base64.b64decode(data_of(result)[0].b64_json or ""), "webp", (300, 200))
    assert recorder.requests[0]["output_format"] == "png"


def test_compression_the_upstream_cannot_apply_is_emulated(upstream, start_gateway):
    recorder, url = upstream
    gateway = start_gateway(openai_model(url, output_formats=["png", "jpeg"]))
    client = openai.OpenAI(base_url=f"{gateway}/v1", api_key="x", max_retries=0)
    raw = client.images.with_raw_response.generate(
        model="up",
        prompt="x",
        size="300x200",
        output_format="jpeg",
        output_compression=30,
        response_format="b64_json",
    )
    data = base64.b64decode(data_of(raw.parse())[0].b64_json or "")
    assert_image(data, "jpeg", (300, 200))
    assert data != recorder.produced[-1]
    assert "output_compression" not in recorder.requests[0]
    report = json.loads(raw.headers["x-flux-proxy-params"])
    assert report["output_compression"]["handling"] == "emulated"
