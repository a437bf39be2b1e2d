"""Routing a public model to an ordered list of providers, and cancelling on disconnect."""

from __future__ import annotations

import json
from typing import Any

import anyio
import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from tests.images import assert_image
from tests.openapi import assert_openai_error
from tests.servers import serve
from tests.upstream_openai import RecordingUpstream
from tests.waiting import wait_for


def failover_config(url: str) -> dict[str, Any]:
    return {
        "models": {
            "flux1.1-pro": {
                "aliases": ["flux-pro-1.1"],
                "providers": [
                    {"provider": "openai", "base_url": f"{url}/v1", "upstream_model": "first"},
                    {"provider": "local"},
                ],
            }
        }
    }


@pytest.mark.parametrize(("status", "headers"), [(503, {}), (401, {}), (429, {"Retry-After": "3"})])
def test_retryable_failure_moves_to_the_next_provider(start_gateway, status, headers):
    recorder = RecordingUpstream(fail_with=(status, {"error": {"message": "down"}}, headers))
    with serve(recorder.app()) as url:
        gateway = start_gateway(failover_config(url))
        response = httpx.post(
            f"{gateway}/v1/images/generations",
            json={
                "model": "flux-pro-1.1",
                "prompt": "x",
                "size": "96x64",
                "response_format": "b64_json",
            },
        )
    assert response.status_code == 200, response.text
    assert len(recorder.requests) == 1
    assert response.headers["x-flux-proxy-provider"] == "local"
    report = json.loads(response.headers["x-flux-proxy-params"])
    assert report["model"]["detail"].startswith("served by provider local")
    assert "after openai (" in report["model"]["detail"]
    import base64

    assert_image(base64.b64decode(response.json()["data"][0]["b64_json"]), "png", (96, 64))


def test_first_provider_answers_when_healthy(start_gateway):
    recorder = RecordingUpstream()
    with serve(recorder.app()) as url:
        gateway = start_gateway(failover_config(url))
        response = httpx.post(
            f"{gateway}/v1/images/generations",
            json={"model": "flux1.1-pro", "prompt": "x", "size": "96x64"},
        )
    assert response.headers["x-flux-proxy-provider"] == "openai"
    assert "failed" not in json.loads(response.headers["x-flux-proxy-params"])["model"]["detail"]


def test_client_errors_do_not_fail_over(start_gateway):
    recorder = RecordingUpstream(
        fail_with=(400, {"error": {"message": "bad prompt", "param": "prompt"}}, {})
    )
    with serve(recorder.app()) as url:
        gateway = start_gateway(failover_config(url))
        response = httpx.post(
            f"{gateway}/v1/images/generations",
            json={"model": "flux1.1-pro", "prompt": "x", "size": "96x64"},
        )
    assert_openai_error(response, 400, "prompt")


def test_models_list_names_every_provider(start_gateway):
    gateway = start_gateway(failover_config("http://127.0.0.1:9"))
    entries = httpx.get(f"{gateway}/v1/models").json()["data"]
    assert entries[0]["owned_by"] == "flux-proxy:openai,local"


def test_a_client_that_goes_away_cancels_the_upstream_call(start_gateway):
    seen: list[str] = []

    async def slow(request: Request) -> JSONResponse:
        seen.append("started")
        for _ in range(200):
            if await request.is_disconnected():
                seen.append("disconnected")
                break
            await anyio.sleep(0.05)
        return JSONResponse({"data": []})

    app = Starlette(routes=[Route("/v1/images/generations", slow, methods=["POST"])])
    with serve(app) as url:
        gateway = start_gateway({"models": {"m": {"provider": "openai", "base_url": f"{url}/v1"}}})
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(
                f"{gateway}/v1/images/generations",
                json={"model": "m", "prompt": "x", "size": "64x64"},
                timeout=0.5,
            )
        wait_for(lambda: "disconnected" in seen)
    assert seen == ["started", "disconnected"]
