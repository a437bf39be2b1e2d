"""The openai-compatible provider: against a recording emulator and another flux-proxy."""

from __future__ import annotations

import base64
import io
import json
import logging
import random
from typing import Any

import httpx
import openai
import pytest

from tests.images import assert_image, data_of
from tests.openapi import assert_openai_error
from tests.servers import ServeUpstream, serve
from tests.upstream_openai import RecordingUpstream

SECRET = "sk-upstream-secret-0123456789"


@pytest.fixture
def recorder(serve_upstream: ServeUpstream) -> RecordingUpstream:
    upstream = RecordingUpstream()
    upstream.url = serve_upstream(upstream.app())  # type: ignore[attr-defined]
    return upstream


def config(url: str, **model: Any) -> dict[str, Any]:
    entry = {
        "provider": "openai",
        "upstream_model": "flux-upstream",
        "base_url": f"{url}/v1",
        "api_key_env": "UPSTREAM_KEY",
        "options": {"response_format": "b64_json"},
        **model,
    }
    return {"models": {"flux1.1-pro": entry}}


def post(gateway: str, **body: Any) -> httpx.Response:
    return httpx.post(
        f"{gateway}/v1/images/generations",
        json={"model": "flux1.1-pro", "prompt": "a kestrel", **body},
        timeout=30,
    )


def test_unknown_parameters_reach_the_upstream_unchanged_and_in_order(recorder, start_gateway):
    gateway = start_gateway(config(recorder.url), environ={"UPSTREAM_KEY": SECRET})
    client = openai.OpenAI(base_url=f"{gateway}/v1", api_key="x", max_retries=0)
    extras = {
        "safety_tolerance": 5,
        "prompt_upsampling": True,
        "image_prompt": "aGVsbG8=",
        "nested": {"b": [1, 2, {"c": None}], "a": "z"},
        "zeta": "last",
    }
    raw = client.images.with_raw_response.generate(
        model="flux1.1-pro", prompt="a kestrel", size="512x512", extra_body=extras
    )
    assert raw.http_response.status_code == 200
    sent = recorder.requests[0]
    assert {k: sent[k] for k in extras} == extras
    assert [k for k in sent if k in extras] == list(extras)
    assert sent["model"] == "flux-upstream"
    assert sent["size"] == "512x512"
    assert recorder.headers[0]["authorization"] == f"Bearer {SECRET}"
    report = json.loads(raw.headers["x-flux-proxy-params"])
    for name in extras:
        assert report[name]["handling"] == "passthrough"


def test_declared_capabilities_drive_what_is_asked(recorder, start_gateway):
    caps = {
        "sizes": {"presets": ["1024x1024", "1536x1024", "1024x1536"]},
        "max_images_per_call": 10,
        "output_formats": ["png", "webp", "jpeg"],
        "accepts_compression": True,
    }
    gateway = start_gateway(config(recorder.url, capabilities=caps), environ={"UPSTREAM_KEY": "k"})
    response = post(
        gateway,
        size="1920x1080",
        n=2,
        output_format="webp",
        output_compression=60,
        response_format="b64_json",
    )
    assert response.status_code == 200, response.text
    sent = recorder.requests[0]
    assert (sent["size"], sent["n"], sent["output_format"], sent["output_compression"]) == (
        "1536x1024",
        2,
        "webp",
        60,
    )
    for item in response.json()["data"]:
        assert_image(base64.b64decode(item["b64_json"]), "webp", (1920, 1080))
    report = json.loads(response.headers["x-flux-proxy-params"])
    assert report["size"]["handling"] == "emulated"
    assert "1536x1024" in report["size"]["detail"]


def test_seed_is_not_sent_to_an_upstream_that_refuses_it(recorder, start_gateway):
    # OpenAI's own API answers 400 to an unknown `seed`: by default none is sent.
    gateway = start_gateway(config(recorder.url), environ={"UPSTREAM_KEY": "k"})
    response = post(gateway, size="64x64", n=2, seed=5, response_format="b64_json")
    assert response.status_code == 200, response.text
    for item in response.json()["data"]:
        assert_image(base64.b64decode(item["b64_json"]), "png", (64, 64))
    assert len(recorder.requests) == 2
    assert all("seed" not in body for body in recorder.requests)
    report = json.loads(response.headers["x-flux-proxy-params"])
    assert report["seed"] == {
        "handling": "ignored",
        "detail": "this upstream does not accept seed",
    }


def test_seed_is_sent_where_the_capabilities_say_the_upstream_takes_it(recorder, start_gateway):
    caps = {"accepts_seed": True}
    gateway = start_gateway(config(recorder.url, capabilities=caps), environ={"UPSTREAM_KEY": "k"})
    response = post(gateway, size="64x64", seed=5, response_format="b64_json")
    assert response.status_code == 200, response.text
    assert [body["seed"] for body in recorder.requests] == [5]
    report = json.loads(response.headers["x-flux-proxy-params"])
    assert report["seed"]["handling"] == "passthrough"


def test_a_wrong_sized_upstream_answer_is_fixed_to_the_exact_size(recorder, start_gateway):
    recorder.force_size = (1000, 1000)
    gateway = start_gateway(config(recorder.url), environ={"UPSTREAM_KEY": "k"})
    response = post(gateway, size="640x360", response_format="b64_json")
    assert_image(base64.b64decode(response.json()["data"][0]["b64_json"]), "png", (640, 360))


def test_another_flux_proxy_as_the_upstream(start_gateway):
    inner = start_gateway()  # embedded default: local renderer
    outer = start_gateway(
        {
            "models": {
                "chained": {
                    "provider": "openai",
                    "upstream_model": "flux1.1-pro",
                    "base_url": f"{inner}/v1",
                    "options": {"response_format": "b64_json"},
                    "capabilities": {
                        "max_images_per_call": 10,
                        "output_formats": ["png", "jpeg", "gif", "webp", "avif"],
                        "accepts_compression": True,
                    },
                }
            }
        }
    )
    client = openai.OpenAI(base_url=f"{outer}/v1", api_key="x", max_retries=0)
    result = client.images.generate(
        model="chained", prompt="x", size="300x200", n=2, output_format="gif"
    )
    for item in data_of(result):
        assert_image(httpx.get(item.url or "").content, "gif", (300, 200))


@pytest.mark.parametrize(
    ("status", "body", "headers", "expected_status", "expected_code"),
    [
        (401, {"error": {"message": f"bad key {SECRET}"}}, {}, 502, "upstream_auth_failed"),
        (403, {"detail": "Not authenticated"}, {}, 502, "upstream_auth_failed"),
        (402, {"title": "Insufficient credit"}, {}, 502, "upstream_insufficient_credit"),
        (429, {"error": {"message": "slow"}}, {"Retry-After": "12"}, 429, "rate_limit_exceeded"),
        (400, {"error": {"message": f"bad {SECRET}", "param": "size"}}, {}, 400, None),
        (422, {"detail": [{"loc": ["body", "width"], "msg": "too big"}]}, {}, 400, None),
        (500, {"error": {"message": "internal"}}, {}, 502, "upstream_error"),
        (503, "<html>overloaded</html>", {}, 502, "upstream_error"),
        (504, {"detail": "gateway timeout"}, {}, 504, "upstream_timeout"),
    ],
)
def test_upstream_errors_are_mapped_and_never_leak_the_key(
    recorder, start_gateway, status, body, headers, expected_status, expected_code
):
    recorder.fail_with = (status, body, headers)
    gateway = start_gateway(config(recorder.url), environ={"UPSTREAM_KEY": SECRET})
    response = post(gateway, size="64x64")
    error = assert_openai_error(response, expected_status)
    assert SECRET not in response.text
    if expected_code:
        assert error["code"] == expected_code
    if status == 429:
        assert response.headers["retry-after"] == "12"
    if status == 400:
        assert error["param"] == "size"
    if status in (401, 403):
        assert "gateway's credentials" in error["message"]


@pytest.mark.parametrize(
    ("error", "expected_code"),
    [
        # dall-e-3's moderation refusal.
        (
            {"type": "invalid_request_error", "code": "content_policy_violation", "param": None},
            "content_policy_violation",
        ),
        # gpt-image's moderation refusal has its own code; clients see OpenAI's usual one.
        (
            {"type": "image_generation_user_error", "code": "moderation_blocked", "param": None},
            "content_policy_violation",
        ),
        ({"type": "invalid_request_error", "code": "invalid_value", "param": "n"}, "invalid_value"),
        # Free text is no code: it would be matched on by client code.
        ({"type": "invalid_request_error", "code": f"key {SECRET} refused"}, None),
        ({"type": "invalid_request_error", "code": 7}, None),
    ],
)
def test_the_upstream_error_code_reaches_the_client(recorder, start_gateway, error, expected_code):
    payload = {"error": {"message": f"refused {SECRET}", **error}}
    recorder.fail_with = (400, payload, {})
    gateway = start_gateway(config(recorder.url), environ={"UPSTREAM_KEY": SECRET})
    response = post(gateway, size="64x64")
    body = assert_openai_error(response, 400)
    assert body["code"] == expected_code
    assert body["type"] == "invalid_request_error"
    assert body["param"] == error.get("param")
    assert SECRET not in response.text


def test_missing_upstream_key_is_a_clear_502(recorder, start_gateway):
    gateway = start_gateway(config(recorder.url), environ={})
    error = assert_openai_error(post(gateway, size="64x64"), 502)
    assert error["code"] == "upstream_credentials_missing"
    assert "UPSTREAM_KEY" in error["message"]
    assert recorder.requests == []


def test_unreachable_upstream_is_502(start_gateway):
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    gateway = start_gateway(config(f"http://127.0.0.1:{port}"), environ={"UPSTREAM_KEY": "k"})
    assert assert_openai_error(post(gateway, size="64x64"), 502)["code"] == "upstream_error"


def test_slow_upstream_is_504(start_gateway):
    import anyio
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def slow(request):
        await anyio.sleep(2)
        return JSONResponse({})

    with serve(Starlette(routes=[Route("/v1/images/generations", slow, methods=["POST"])])) as url:
        settings = config(url)
        settings["limits"] = {"upstream_timeout": 0.2}
        gateway = start_gateway(settings, environ={"UPSTREAM_KEY": "k"})
        error = assert_openai_error(post(gateway, size="64x64"), 504)
    assert error["code"] == "upstream_timeout"


@pytest.mark.parametrize(
    "payload",
    [
        "not json",
        [],
        {},
        {"data": []},
        {"data": [{"b64_json": "!!!"}]},
        {"data": [{}]},
        {"data": [{"b64_json": "aGVsbG8="}]},
    ],
)
def test_malformed_upstream_answers_are_502(start_gateway, payload):
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse, PlainTextResponse
    from starlette.routing import Route

    async def broken(request):
        if payload == "not json":
            return PlainTextResponse(payload)
        return JSONResponse(payload)

    with serve(
        Starlette(routes=[Route("/v1/images/generations", broken, methods=["POST"])])
    ) as url:
        gateway = start_gateway(config(url), environ={"UPSTREAM_KEY": "k"})
        assert_openai_error(post(gateway, size="64x64", response_format="b64_json"), 502)


def test_each_upstream_call_is_logged_as_httpx_logs_its_requests(recorder, start_gateway, caplog):
    """Provider calls go past httpx's client straight to its transport (runtime.exchange);
    the request line httpx writes for each is written all the same."""
    caplog.set_level(logging.INFO, logger="httpx")
    gateway = start_gateway(config(recorder.url), environ={"UPSTREAM_KEY": SECRET})
    assert post(gateway, size="64x64").status_code == 200
    line = f'HTTP Request: POST {recorder.url}/v1/images/generations "HTTP/1.1 200 OK"'
    assert line in caplog.text


def test_base64_written_with_json_escapes_is_read_as_json_says(start_gateway):
    """JSON may write "/" as "\\/" (PHP's encoder does): the text passed on is the
    string the JSON holds, byte for byte the upstream's image; an escape that makes a
    non-ASCII character is no base64, a 502."""
    from PIL import Image
    from starlette.applications import Starlette
    from starlette.responses import Response
    from starlette.routing import Route

    noise = Image.frombytes("RGB", (32, 32), random.Random(7).randbytes(32 * 32 * 3))
    buffer = io.BytesIO()
    noise.save(buffer, "PNG")
    png = buffer.getvalue()
    text = base64.b64encode(png).decode()
    assert "/" in text  # what the upstream escapes
    answers = {
        "escaped": text.replace("/", "\\/"),
        "not ascii": text[:8] + "\\u00e9" + text[9:],
    }

    async def escaping(request):
        form = (await request.json())["prompt"]
        body = '{"created": 1, "data": [{"b64_json": "' + answers[form] + '"}]}'
        return Response(body, media_type="application/json")

    routes = [Route("/v1/images/generations", escaping, methods=["POST"])]
    with serve(Starlette(routes=routes)) as url:
        gateway = start_gateway(config(url), environ={"UPSTREAM_KEY": "k"})
        answered = post(gateway, prompt="escaped", size="32x32", response_format="b64_json")
        assert answered.status_code == 200, answered.text
        assert base64.b64decode(answered.json()["data"][0]["b64_json"]) == png
        refused = post(gateway, prompt="not ascii", size="32x32", response_format="b64_json")
        assert_openai_error(refused, 502)


@pytest.mark.anyio
async def test_upstream_cookies_are_never_replayed():
    from flux_proxy import FluxProxy
    from tests.images import make_image

    cookies_seen: list[str | None] = []

    def upstream(request: httpx.Request) -> httpx.Response:
        cookies_seen.append(request.headers.get("cookie"))
        image = base64.b64encode(make_image("png", (64, 64))).decode()
        return httpx.Response(
            200, json={"data": [{"b64_json": image}]}, headers={"set-cookie": "session=abc; Path=/"}
        )

    gateway = FluxProxy(
        {"models": {"m": {"provider": "openai", "base_url": "http://upstream.test/v1"}}},
        environ={},
        transport=httpx.MockTransport(upstream),
    )
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=gateway), base_url="http://gateway.test"
    ) as client:
        for _ in range(2):
            response = await client.post(
                "/v1/images/generations",
                json={"model": "m", "prompt": "x", "size": "64x64", "response_format": "b64_json"},
            )
            assert response.status_code == 200, response.text
    assert cookies_seen == [None, None]
