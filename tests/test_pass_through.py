"""What the gateway passes on as it is, and what it still checks on the way.

Where the provider made what was asked, the upstream's base64 text and (with
``store.return_upstream_urls``) its URLs reach the client untouched; format, size
and completeness are read from the image's first and last bytes, so a truncated
upstream image is a 502, never a 200.
"""

from __future__ import annotations

import base64
import json
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tests.images import assert_image, make_image, non_canonical_base64
from tests.openapi import assert_openai_error
from tests.servers import ServeUpstream
from tests.upstream_openai import RecordingUpstream, gateway_config


@pytest.fixture
def upstream(serve_upstream: ServeUpstream) -> tuple[RecordingUpstream, str]:
    recorder = RecordingUpstream()
    return recorder, serve_upstream(recorder.app())


def model(url: str, answers: str = "b64_json", **store: Any) -> dict[str, Any]:
    capabilities = {"output_formats": ["png", "jpeg", "webp"]}
    return gateway_config(url, answers, capabilities, **store)


def generate(gateway: str, **body: Any) -> httpx.Response:
    payload = {"model": "up", "prompt": "x", "size": "200x100", **body}
    return httpx.post(f"{gateway}/v1/images/generations", json=payload, timeout=30)


def report(response: httpx.Response) -> dict[str, Any]:
    parsed: dict[str, Any] = json.loads(response.headers["x-flux-proxy-params"])
    return parsed


def test_unchanged_base64_reaches_the_client_as_the_upstream_wrote_it(
    serve_upstream, start_gateway
):
    # A PNG whose length is no multiple of 3, so its base64 ends in padding.
    width = next(w for w in range(10, 40) if len(make_image("png", (w, 30))) % 3)
    size = (width, 30)
    image = make_image("png", size)
    text = non_canonical_base64(image)

    async def answer(request: Request) -> JSONResponse:
        return JSONResponse({"created": 1, "data": [{"b64_json": text}]})

    app = Starlette(routes=[Route("/v1/images/generations", answer, methods=["POST"])])
    gateway = start_gateway(model(serve_upstream(app)))
    response = generate(gateway, size=f"{size[0]}x{size[1]}", response_format="b64_json")
    assert response.status_code == 200, response.text
    passed_on = response.json()["data"][0]["b64_json"]
    assert passed_on == text
    assert_image(base64.b64decode(passed_on), "png", size)


@pytest.mark.parametrize("stray", ["!", "=", "\\u0021"])
def test_base64_with_a_stray_character_inside_is_a_502(serve_upstream, start_gateway, stray):
    # Past the header and before the end, so only the check of the whole text sees it;
    # "\\u0021" is JSON's escape of "!", read by the parser (the text is a str then).
    image = make_image("png", (64, 64))
    text = base64.b64encode(image).decode()
    middle = len(text) // 2 // 4 * 4
    body = json.dumps({"created": 1, "data": [{"b64_json": "TEXT"}]})
    body = body.replace("TEXT", text[:middle] + stray + text[middle + 1 :])

    async def answer(request: Request) -> Response:
        return Response(body, media_type="application/json")

    app = Starlette(routes=[Route("/v1/images/generations", answer, methods=["POST"])])
    gateway = start_gateway(model(serve_upstream(app)))
    for response_format in ("b64_json", "url"):
        response = generate(gateway, size="64x64", response_format=response_format)
        error = assert_openai_error(response, 502)
        assert "base64 is invalid" in error["message"], error


@pytest.mark.parametrize("fmt", ["png", "jpeg", "webp"])
@pytest.mark.parametrize("answers", ["b64_json", "url"])
def test_a_truncated_upstream_image_is_a_502_that_says_so(upstream, start_gateway, answers, fmt):
    recorder, url = upstream
    recorder.truncate = 7
    gateway = start_gateway(model(url, answers))
    for response_format in ("b64_json", "url"):
        response = generate(gateway, output_format=fmt, response_format=response_format)
        error = assert_openai_error(response, 502)
        assert f"truncated {fmt} image" in error["message"], error


def test_an_upstream_url_is_passed_on_unchecked_by_default(upstream, start_gateway):
    recorder, url = upstream
    gateway = start_gateway(model(url, "url", return_upstream_urls=True))
    response = generate(gateway, output_format="webp", response_format="url")
    assert response.status_code == 200, response.text
    link = response.json()["data"][0]["url"]
    assert link.startswith(f"{url}/files/")
    assert recorder.downloads == []  # the gateway never fetched it
    entry = report(response)["response_format"]
    assert entry["handling"] == "passthrough", entry  # the upstream's link, untouched
    assert "not downloaded or checked" in entry["detail"], entry
    assert "assumed webp 200x100" in entry["detail"], entry
    assert_image(httpx.get(link).content, "webp", (200, 100))


def test_an_unchecked_url_is_reported_even_when_response_format_was_not_sent(
    upstream, start_gateway
):
    recorder, url = upstream
    gateway = start_gateway(model(url, "url", return_upstream_urls=True))
    response = generate(gateway)
    assert response.status_code == 200, response.text
    assert recorder.downloads == []
    assert "assumed png 200x100" in report(response)["response_format"]["detail"]


def test_verify_upstream_urls_checks_each_image_once_and_keeps_its_url(upstream, start_gateway):
    recorder, url = upstream
    gateway = start_gateway(model(url, "url", return_upstream_urls=True, verify_upstream_urls=True))
    response = generate(gateway, output_format="jpeg", response_format="url")
    assert response.status_code == 200, response.text
    link = response.json()["data"][0]["url"]
    assert link.startswith(f"{url}/files/")
    assert len(recorder.downloads) == 1
    assert "not downloaded" not in report(response)["response_format"]["detail"]
    assert_image(httpx.get(link).content, "jpeg", (200, 100))


def test_verify_upstream_urls_refuses_a_truncated_image(upstream, start_gateway):
    recorder, url = upstream
    recorder.truncate = 3
    config = model(url, "url", return_upstream_urls=True, verify_upstream_urls=True)
    gateway = start_gateway(config)
    error = assert_openai_error(generate(gateway, response_format="url"), 502)
    assert "truncated png image" in error["message"]


def test_an_image_that_must_change_is_downloaded_and_hosted_even_unverified(
    upstream, start_gateway
):
    recorder, url = upstream
    config = model(url, "url", return_upstream_urls=True)
    # Multiples of 16 only: 200x100 is made at 208x112 and resized by the gateway.
    config["models"]["up"]["capabilities"]["sizes"] = {"multiple_of": 16}
    gateway = start_gateway(config)
    response = generate(gateway, response_format="url")
    assert response.status_code == 200, response.text
    hosted = response.json()["data"][0]["url"]
    assert hosted.startswith(gateway)
    assert len(recorder.downloads) == 1
    assert_image(httpx.get(hosted).content, "png", (200, 100))
