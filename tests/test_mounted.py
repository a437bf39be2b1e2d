"""Mounted mode: flux-proxy inside a host Starlette app, as middleware or under a Mount."""

from __future__ import annotations

import base64
import json
import logging
import socket
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import openai
import pytest
import uvicorn
from asgi_lifespan import LifespanManager
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Mount, Route

from flux_proxy import FluxProxy, FluxProxyMiddleware
from flux_proxy.config import ConfigError
from tests.asgi import asgi_client
from tests.images import assert_image, data_of
from tests.openapi import assert_matches
from tests.servers import serve
from tests.upstream_openai import RecordingUpstream


class HostApp:
    """A host application with its own routes and lifespan, recording what reached it."""

    def __init__(self) -> None:
        self.events: list[str] = []
        self.seen: list[str] = []

    def build(
        self, routes: list[Any] | None = None, middleware: list[Middleware] | None = None
    ) -> Starlette:
        @asynccontextmanager
        async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
            self.events.append("startup")
            yield {"greeting": "hello from the host"}
            self.events.append("shutdown")

        own_routes = [
            Route("/health", self.health),
            Route("/v1/other", self.echo, methods=["GET", "POST", "PUT"]),
            Route("/v1/images/edits", self.edits, methods=["POST"]),
            Route("/links", self.links),
            Route("/v1/models/", self.edits),
        ]
        return Starlette(
            routes=own_routes + (routes or []), lifespan=lifespan, middleware=middleware
        )

    async def health(self, request: Request) -> Response:
        self.seen.append(request.url.path)
        return PlainTextResponse(request.state.greeting)

    async def echo(self, request: Request) -> Response:
        self.seen.append(request.url.path)
        body = await request.body()
        return JSONResponse(
            {
                "method": request.method,
                "path": request.url.path,
                "query": request.url.query,
                "body": body.decode(),
                "x-custom": request.headers.get("x-custom"),
                "authorization": request.headers.get("authorization"),
            },
            status_code=201 if request.method == "POST" else 200,
            headers={"x-host": "yes"},
        )

    async def edits(self, request: Request) -> Response:
        self.seen.append(request.url.path)
        return JSONResponse({"handled_by": "host"})

    async def links(self, request: Request) -> Response:
        return PlainTextResponse(str(request.url_for("health")))


@pytest.fixture
def host() -> HostApp:
    return HostApp()


def with_gateway(host: HostApp, config: dict[str, Any] | None = None) -> Starlette:
    app = host.build()
    app.add_middleware(
        FluxProxyMiddleware,
        config={"limits": {"max_n": 2}} if config is None else config,
        environ={},
    )
    return app


# --- middleware mode, in process --------------------------------------------------------


@pytest.mark.anyio
async def test_host_lifespan_runs_through_the_middleware(host):
    app = with_gateway(host)
    async with asgi_client(app) as client:
        assert host.events == ["startup"]
        # The host's lifespan state reaches the host's handlers.
        health = await client.get("/health")
        assert health.status_code == 200
        assert health.text == "hello from the host"
    assert host.events == ["startup", "shutdown"]


@pytest.mark.anyio
async def test_mounted_start_up_logs_the_summary_and_unset_keys(host, caplog):
    models = {"flux-bfl": {"provider": "bfl"}}
    with caplog.at_level(logging.INFO, logger="flux_proxy"):
        async with asgi_client(with_gateway(host, {"models": models})):
            pass
    logged = [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "flux_proxy"]
    assert logged[0][0] == "WARNING" and "BFL_API_KEY is not set" in logged[0][1]
    assert logged[1][0] == "INFO" and logged[1][1].startswith("serving 1 model (flux-bfl -> bfl)")


@pytest.mark.anyio
async def test_image_requests_are_answered_by_the_gateway(host):
    async with asgi_client(with_gateway(host)) as client:
        response = await client.post(
            "/v1/images/generations",
            json={"model": "flux-pro-1.1", "prompt": "a fox", "size": "512x256"},
        )
        assert response.status_code == 200, response.text
        assert response.headers["x-flux-proxy-provider"] == "local"
        assert_matches(response.json(), "ImagesResponse")
        url = response.json()["data"][0]["url"]
        assert url.startswith("http://testserver/v1/images/files/")
        download = await client.get(url)
        assert download.status_code == 200
        assert download.headers["content-type"] == "image/png"
        assert_image(download.content, "png", (512, 256))

        listed = await client.get("/v1/models")
        assert [model["id"] for model in listed.json()["data"]] == ["flux1.1-pro", "flux-pro-1.1"]
    assert host.seen == []  # none of these reached the host


@pytest.mark.anyio
async def test_mounted_config_dict_is_applied(host):
    async with asgi_client(with_gateway(host, {"limits": {"max_n": 2}})) as client:
        too_many = await client.post("/v1/images/generations", json={"prompt": "x", "n": 3})
        assert too_many.status_code == 400
        assert too_many.json()["error"]["param"] == "n"
        two = await client.post(
            "/v1/images/generations",
            json={"prompt": "x", "n": 2, "size": "64x48", "response_format": "b64_json"},
        )
        assert two.status_code == 200, two.text
        images = [base64.b64decode(item["b64_json"]) for item in two.json()["data"]]
        assert len(images) == 2
        for image in images:
            assert_image(image, "png", (64, 48))


@pytest.mark.anyio
async def test_other_requests_reach_the_host_untouched(host):
    async with asgi_client(with_gateway(host)) as client:
        response = await client.post(
            "/v1/other?a=1&b=two",
            content=b'{"raw": "bytes, not re-encoded"}',
            headers={"x-custom": "kept", "authorization": "Bearer host-token"},
        )
        assert response.status_code == 201
        assert response.headers["x-host"] == "yes"
        assert response.json() == {
            "method": "POST",
            "path": "/v1/other",
            "query": "a=1&b=two",
            "body": '{"raw": "bytes, not re-encoded"}',
            "x-custom": "kept",
            "authorization": "Bearer host-token",
        }
        # An image route flux-proxy does not serve is the host's to answer.
        edits = await client.post("/v1/images/edits", json={"prompt": "x"})
        assert edits.json() == {"handled_by": "host"}
        # Unknown paths get the host's own 404, not an OpenAI error body.
        missing = await client.get("/nowhere")
        assert missing.status_code == 404
        assert missing.text == "Not Found"
    assert host.seen == ["/v1/other", "/v1/images/edits"]


@pytest.mark.anyio
async def test_host_routing_helpers_still_see_the_host_router(host):
    async with asgi_client(with_gateway(host)) as client:
        link = await client.get("/links")
        # Not the gateway's "/v1/models": the host's own route, never redirected.
        slash = await client.get("/v1/models/")
    assert link.status_code == 200, link.text
    assert link.text == "http://testserver/health"
    assert slash.json() == {"handled_by": "host"}


BAD_CONFIG = Middleware(FluxProxyMiddleware, config={"limits": {"max_m": 2}}, environ={})


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("config", "failure", "message"),
    [
        ({"limits": {"max_m": 2}}, ConfigError, r"limits\.max_m"),
        ({"middlewares": ["nope"]}, ConfigError, r"middlewares.*nope"),
        ({"store": {"backend": "directory", "directory": "/dev/null/x"}}, OSError, "/dev/null"),
    ],
)
async def test_a_bad_mounted_config_fails_the_host_startup(host, config, failure, message):
    app = host.build(middleware=[Middleware(FluxProxyMiddleware, config=config, environ={})])
    with pytest.raises(failure, match=message):
        async with LifespanManager(app):
            pass
    assert host.events == []  # the host's own startup never ran


@pytest.mark.anyio
async def test_a_bad_mounted_config_stops_uvicorn_with_the_message(host, caplog):
    server = uvicorn.Server(uvicorn.Config(host.build(middleware=[BAD_CONFIG]), log_config=None))
    with socket.socket() as sock, caplog.at_level(logging.INFO, logger="uvicorn.error"):
        sock.bind(("127.0.0.1", 0))
        with pytest.raises(SystemExit) as exited:
            await server.serve(sockets=[sock])
    assert exited.value.code == 3  # uvicorn's "startup failed"
    assert not server.started
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert any(m.startswith("flux-proxy: ") and "limits.max_m" in m for m in errors), errors
    assert not any("Traceback" in m for m in errors)
    assert host.events == []


# --- middleware mode under uvicorn, with the openai SDK ---------------------------------


def test_mounted_gateway_under_uvicorn_with_the_sdk(host):
    with serve(with_gateway(host)) as base_url:
        assert host.events == ["startup"]
        client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="x", max_retries=0, timeout=30)
        result = client.images.generate(model="flux1.1-pro", prompt="a fox", size="1024x1024")
        url = data_of(result)[0].url
        assert url is not None and url.startswith(f"{base_url}/v1/images/files/")
        download = httpx.get(url)
        assert download.status_code == 200
        assert_image(download.content, "png", (1024, 1024))

        b64 = client.images.generate(
            model="flux-pro-1.1", prompt="a fox", size="300x200", response_format="b64_json"
        )
        assert_image(base64.b64decode(data_of(b64)[0].b64_json or ""), "png", (300, 200))

        assert httpx.get(f"{base_url}/health").text == "hello from the host"
        other = httpx.put(f"{base_url}/v1/other", content=b"payload")
        assert other.json()["body"] == "payload" and other.json()["method"] == "PUT"
    assert host.events == ["startup", "shutdown"]
    assert host.seen == ["/health", "/v1/other"]


# --- under a Starlette Mount ------------------------------------------------------------


@pytest.fixture
def mounted(host: HostApp) -> Iterator[str]:
    app = host.build([Mount("/gateway", app=FluxProxy({}, environ={}))])
    with serve(app) as base_url:
        yield base_url


def test_sdk_through_a_mount_prefix(mounted, host):
    client = openai.OpenAI(base_url=f"{mounted}/gateway/v1", api_key="x", max_retries=0, timeout=30)
    assert [model.id for model in client.models.list()] == ["flux1.1-pro", "flux-pro-1.1"]
    result = client.images.generate(
        model="flux1.1-pro", prompt="a fox", size="640x360", response_format="b64_json"
    )
    assert_image(base64.b64decode(data_of(result)[0].b64_json or ""), "png", (640, 360))
    # The gateway answers only under its mount; the host keeps the rest.
    assert httpx.post(f"{mounted}/v1/images/generations", json={"prompt": "x"}).status_code == 404
    assert httpx.get(f"{mounted}/health").text == "hello from the host"
    assert host.seen == ["/health"]


def test_image_url_through_a_mount_includes_the_prefix(mounted):
    client = openai.OpenAI(base_url=f"{mounted}/gateway/v1", api_key="x", max_retries=0, timeout=30)
    result = client.images.generate(model="flux1.1-pro", prompt="a fox", size="1024x1024")
    url = data_of(result)[0].url
    assert url is not None
    assert url.startswith(f"{mounted}/gateway/v1/images/files/"), url
    download = httpx.get(url)
    assert download.status_code == 200
    assert_image(download.content, "png", (1024, 1024))


@pytest.mark.anyio
async def test_mount_prefix_in_process(host):
    app = host.build([Mount("/gateway", app=FluxProxy({}, environ={}))])
    async with asgi_client(app) as client:
        response = await client.post(
            "/gateway/v1/images/generations",
            json={"prompt": "x", "size": "128x96", "response_format": "b64_json"},
        )
        assert response.status_code == 200, response.text
        assert_image(base64.b64decode(response.json()["data"][0]["b64_json"]), "png", (128, 96))
        unknown = await client.get("/gateway/v1/nothing-here")
        assert unknown.status_code == 404
        assert unknown.json()["error"]["code"] == "unknown_url"


# --- the host app's lifespan may run more than once -------------------------------------


@pytest.fixture
def upstream() -> Iterator[str]:
    with serve(RecordingUpstream().app()) as base_url:
        yield base_url


@pytest.mark.anyio
async def test_gateway_survives_a_second_lifespan_cycle(host, upstream):
    app = with_gateway(
        host, {"models": {"relay": {"provider": "openai", "base_url": f"{upstream}/v1"}}}
    )
    body = {"model": "relay", "prompt": "x", "size": "80x60", "response_format": "b64_json"}
    for _ in range(2):
        async with asgi_client(app) as client:
            response = await client.post("/v1/images/generations", content=json.dumps(body))
            assert response.status_code == 200, response.text
            image = base64.b64decode(response.json()["data"][0]["b64_json"])
            assert_image(image, "png", (80, 60))
    assert host.events == ["startup", "shutdown", "startup", "shutdown"]
