"""/healthz and /readyz: outside the API prefix, open to probes without client keys,
cheap (no provider is asked), and honest about a missing store and a shutdown."""

from __future__ import annotations

import logging
import shutil
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from asgi_lifespan import LifespanManager
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from flux_proxy import FluxProxy, FluxProxyMiddleware
from tests.servers import serve
from tests.upstream_openai import RecordingUpstream

KEYS = {"FLUX_PROXY_API_KEYS": "sk-client"}


@pytest.fixture
def upstream() -> Iterator[tuple[RecordingUpstream, str]]:
    recording = RecordingUpstream()
    with serve(recording.app()) as base_url:
        yield recording, base_url


def relay(base_url: str, **server: Any) -> dict[str, Any]:
    return {
        "server": server,
        "models": {"relay": {"provider": "openai", "base_url": f"{base_url}/v1"}},
    }


@asynccontextmanager
async def in_process(app: Any) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        yield client


def test_probes_answer_without_client_keys_and_ask_no_provider(start_gateway, upstream):
    recording, base_url = upstream
    gateway = start_gateway(relay(base_url), environ={**KEYS, "OPENAI_API_KEY": "sk-up"})
    with httpx.Client(base_url=gateway) as http:
        assert http.get("/v1/models").status_code == 401  # keys are on
        live = http.get("/healthz")
        ready = http.get("/readyz")
        head_live = http.head("/healthz")
        head_ready = http.head("/readyz")
    assert (live.status_code, live.json()) == (200, {"status": "ok"})
    assert ready.status_code == 200, ready.text
    assert ready.json() == {
        "status": "ready",
        "checks": {"config": "ok", "store": "ok", "lifecycle": "ok"},
    }
    for response in (live, ready):
        assert response.headers["cache-control"] == "no-store"
    for head, get in ((head_live, live), (head_ready, ready)):
        assert head.status_code == 200
        assert head.content == b""
        assert head.headers["content-length"] == get.headers["content-length"]
    assert recording.requests == []  # cheap: the provider never heard of the probes


def test_probes_live_at_the_root_whatever_the_api_prefix(start_gateway):
    gateway = start_gateway({"server": {"api_prefix": "/api/openai"}})
    with httpx.Client(base_url=gateway) as http:
        assert http.get("/healthz").status_code == 200
        assert http.get("/readyz").status_code == 200
        assert http.get("/api/openai/healthz").status_code == 404
        assert http.get("/api/openai/models").status_code == 200


def test_a_wrong_method_gets_an_openai_405(start_gateway):
    gateway = start_gateway()
    response = httpx.post(f"{gateway}/readyz")
    assert response.status_code == 405
    assert response.headers["allow"] == "GET, HEAD"
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}


def test_health_paths_can_be_turned_off(start_gateway):
    gateway = start_gateway({"server": {"health_paths": False}})
    response = httpx.get(f"{gateway}/healthz")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "unknown_url"


def test_probes_are_logged_at_debug_only(start_gateway, caplog):
    gateway = start_gateway()
    with caplog.at_level(logging.DEBUG, logger="flux_proxy"):
        assert httpx.get(f"{gateway}/healthz").status_code == 200
        assert httpx.get(f"{gateway}/v1/models").status_code == 200
    probe_lines = [r for r in caplog.records if "/healthz" in r.getMessage()]
    model_lines = [r for r in caplog.records if "/v1/models" in r.getMessage()]
    assert [r.levelno for r in probe_lines] == [logging.DEBUG]
    assert [r.levelno for r in model_lines] == [logging.INFO]


@pytest.mark.anyio
async def test_a_missing_image_directory_makes_the_gateway_not_ready(tmp_path: Path) -> None:
    images = tmp_path / "images"
    app = FluxProxy({"store": {"backend": "directory", "directory": str(images)}}, environ={})
    async with in_process(app) as client:
        assert (await client.get("/readyz")).status_code == 200
        shutil.rmtree(images)
        missing = await client.get("/readyz")
        assert (await client.get("/healthz")).status_code == 200  # alive all the same
        images.mkdir()
        back = await client.get("/readyz")
    assert missing.status_code == 503
    assert missing.json() == {
        "status": "not ready",
        "checks": {
            "config": "ok",
            "store": "the image directory does not exist",
            "lifecycle": "ok",
        },
    }
    assert str(tmp_path) not in missing.text  # the path is no probe's business
    assert back.status_code == 200


class _BrokenStore:
    async def problem(self) -> str | None:
        raise ConnectionError("the bucket's endpoint refused the connection")


@pytest.mark.anyio
async def test_a_store_check_that_raises_is_not_ready_not_a_500(caplog):
    app = FluxProxy({}, environ={})
    app.health._store = _BrokenStore()  # type: ignore[assignment]
    async with in_process(app) as client:
        response = await client.get("/readyz")
    assert response.status_code == 503
    assert response.json()["checks"]["store"] == "the image store check failed"
    assert "refused" not in response.text


@pytest.mark.anyio
async def test_standalone_is_not_ready_once_lifespan_shutdown_starts():
    app = FluxProxy({}, environ={})
    async with in_process(app) as client:
        for _ in range(2):  # a second lifespan cycle is ready again
            async with LifespanManager(app):
                assert (await client.get("/readyz")).status_code == 200
            stopped = await client.get("/readyz")
            assert stopped.status_code == 503
            assert stopped.json()["checks"]["lifecycle"] == "shutting down"
            assert (await client.get("/healthz")).status_code == 200


# --- mounted: the host's own paths come first -------------------------------------------


def host_app(routes: list[Route], gateway: dict[str, Any]) -> Starlette:
    app = Starlette(routes=routes)
    app.add_middleware(FluxProxyMiddleware, config=gateway, environ={})
    return app


async def host_health(request: Request) -> Response:
    return PlainTextResponse("the host's own")


@pytest.mark.anyio
async def test_mounted_the_host_keeps_its_own_health_route_by_default():
    app = host_app([Route("/healthz", host_health)], {})
    async with LifespanManager(app), in_process(app) as client:
        own = await client.get("/healthz")
        readyz = await client.get("/readyz")
    assert own.text == "the host's own"
    assert readyz.status_code == 404  # the host's 404: the gateway added no path of its own
    assert "error" not in readyz.text


@pytest.mark.anyio
async def test_mounted_with_health_paths_on_the_gateway_answers_and_follows_the_host_lifespan():
    app = host_app([Route("/healthz", host_health)], {"server": {"health_paths": True}})
    async with in_process(app) as client:
        async with LifespanManager(app):
            live = await client.get("/healthz")
            ready = await client.get("/readyz")
        stopped = await client.get("/readyz")
    assert live.json() == {"status": "ok"}
    assert ready.status_code == 200
    assert stopped.status_code == 503
    assert stopped.json()["checks"]["lifecycle"] == "shutting down"
