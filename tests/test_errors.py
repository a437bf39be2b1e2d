"""Bad input gets an OpenAI-format error with the right status, never a 500."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from tests.openapi import assert_openai_error


@pytest.fixture
def post(gateway: str) -> Callable[..., httpx.Response]:
    def send(body: object, **kwargs: Any) -> httpx.Response:
        if isinstance(body, bytes | str):
            return httpx.post(f"{gateway}/v1/images/generations", content=body, **kwargs)
        return httpx.post(f"{gateway}/v1/images/generations", json=body, **kwargs)

    return send


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "flux1.1-pro"}, "prompt"),
        ({"model": "flux1.1-pro", "prompt": ""}, "prompt"),
        ({"model": "flux1.1-pro", "prompt": 5}, "prompt"),
        ({"model": "flux1.1-pro", "prompt": "x", "n": 0}, "n"),
        ({"model": "flux1.1-pro", "prompt": "x", "n": -1}, "n"),
        ({"model": "flux1.1-pro", "prompt": "x", "n": "2"}, "n"),
        ({"model": "flux1.1-pro", "prompt": "x", "n": 2.5}, "n"),
        ({"model": "flux1.1-pro", "prompt": "x", "n": 11}, "n"),
        ({"model": "flux1.1-pro", "prompt": "x", "size": "0x10"}, "size"),
        ({"model": "flux1.1-pro", "prompt": "x", "size": "-1x10"}, "size"),
        ({"model": "flux1.1-pro", "prompt": "x", "size": "20000x10"}, "size"),
        ({"model": "flux1.1-pro", "prompt": "x", "size": "10000x10000"}, "size"),
        ({"model": "flux1.1-pro", "prompt": "x", "size": "huge"}, "size"),
        ({"model": "flux1.1-pro", "prompt": "x", "size": 1024}, "size"),
        ({"model": "flux1.1-pro", "prompt": "x", "aspect_ratio": "tall"}, "aspect_ratio"),
        ({"model": "flux1.1-pro", "prompt": "x", "resolution": "8K?"}, "resolution"),
        ({"model": "flux1.1-pro", "prompt": "x", "output_format": "bmp"}, "output_format"),
        ({"model": "flux1.1-pro", "prompt": "x", "output_compression": 101}, "output_compression"),
        ({"model": "flux1.1-pro", "prompt": "x", "response_format": "base64"}, "response_format"),
        ({"model": "flux1.1-pro", "prompt": "x", "seed": "abc"}, "seed"),
        ({"model": 7, "prompt": "x"}, "model"),
    ],
)
def test_invalid_parameters_are_400_naming_the_param(post, body, param):
    error = assert_openai_error(post(body), 400, param)
    assert error["type"] == "invalid_request_error"
    assert param in error["message"].lower()


@pytest.mark.parametrize("raw", [b"", b"{", b"not json", b"[1, 2]", b"\xff\xfe", b'"prompt"'])
def test_bodies_that_are_not_a_json_object_are_400(post, raw):
    assert_openai_error(post(raw), 400)


def test_unknown_model_is_404_model_not_found(post):
    error = assert_openai_error(post({"model": "dall-e-9", "prompt": "x"}), 404, "model")
    assert error["code"] == "model_not_found"
    assert "dall-e-9" in error["message"]


def test_body_too_large_is_413(start_gateway):
    gateway = start_gateway({"limits": {"max_body_bytes": 4096}})
    body = json.dumps({"model": "flux1.1-pro", "prompt": "x" * 10_000})
    response = httpx.post(f"{gateway}/v1/images/generations", content=body)
    error = assert_openai_error(response, 413)
    assert error["code"] == "request_too_large"


def test_body_too_large_without_content_length_is_413(start_gateway):
    gateway = start_gateway({"limits": {"max_body_bytes": 4096}})

    def chunks() -> Iterator[bytes]:
        yield b'{"model": "flux1.1-pro", "prompt": "'
        for _ in range(10):
            yield b"x" * 1000
        yield b'"}'

    response = httpx.post(f"{gateway}/v1/images/generations", content=chunks())
    assert_openai_error(response, 413)


def test_client_keys_when_configured(start_gateway):
    gateway = start_gateway(environ={"FLUX_PROXY_API_KEYS": "key-one, key-two"})
    url = f"{gateway}/v1/images/generations"
    body = {"model": "flux1.1-pro", "prompt": "x", "size": "64x64"}
    missing = assert_openai_error(httpx.post(url, json=body), 401)
    assert missing["code"] == "missing_api_key"
    wrong = httpx.post(url, json=body, headers={"Authorization": "Bearer nope"})
    assert assert_openai_error(wrong, 401)["code"] == "invalid_api_key"
    assert_openai_error(httpx.get(f"{gateway}/v1/models"), 401)
    for key in ("key-one", "key-two"):
        ok = httpx.post(url, json=body, headers={"Authorization": f"Bearer {key}"})
        assert ok.status_code == 200, ok.text


def test_wrong_method_is_405(gateway):
    assert_openai_error(httpx.get(f"{gateway}/v1/images/generations"), 405)


def test_unknown_path_is_404_in_openai_shape(gateway):
    assert_openai_error(httpx.get(f"{gateway}/v1/nothing-here"), 404)


def test_n_limit_is_configurable(start_gateway):
    gateway = start_gateway({"limits": {"max_n": 2}})
    body = {"model": "flux1.1-pro", "prompt": "x", "n": 3, "size": "32x32"}
    error = assert_openai_error(httpx.post(f"{gateway}/v1/images/generations", json=body), 400, "n")
    assert "at most 2" in error["message"]


def test_request_time_limit_gives_504(start_gateway):
    gateway = start_gateway({"limits": {"request_timeout": 0.05}})
    body = {"model": "flux1.1-pro", "prompt": "x", "n": 4, "size": "4096x4096"}
    response = httpx.post(f"{gateway}/v1/images/generations", json=body, timeout=60)
    assert assert_openai_error(response, 504)["code"] == "upstream_timeout"
