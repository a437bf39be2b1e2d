"""The HTTP edge: which requests are the gateway's, their methods, HEAD and the rest.

In process (httpx.ASGITransport): routing is the point, not the socket. ASGITransport
passes on whatever body the app sends, so a HEAD answer here shows the app's own.
"""

from __future__ import annotations

import httpx
import pytest

from flux_proxy import FluxProxy
from tests.asgi import asgi_client
from tests.images import assert_image
from tests.openapi import assert_openai_error

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("GET", "/v1/images/generations", "POST"),
        ("PUT", "/v1/images/generations", "POST"),
        ("HEAD", "/v1/images/generations", "POST"),
        ("POST", "/v1/models", "GET, HEAD"),
        ("DELETE", "/v1/models/flux1.1-pro", "GET, HEAD"),
        ("POST", "/v1/images/files/abc.png", "GET, HEAD"),
    ],
)
async def test_a_wrong_method_is_a_405_naming_the_allowed_ones(method, path, allowed):
    async with asgi_client(FluxProxy({}, environ={})) as client:
        response = await client.request(method, path)
    assert response.headers["allow"] == allowed
    if method == "HEAD":  # no body to read the error from
        assert response.status_code == 405
        return
    error = assert_openai_error(response, 405)
    assert error["code"] == "method_not_allowed"
    assert method in error["message"]


@pytest.mark.parametrize("path", ["/v1/models", "/v1/models/flux-pro-1.1"])
async def test_head_answers_what_get_does_without_the_body(path):
    async with asgi_client(FluxProxy({}, environ={})) as client:
        got = await client.get(path)
        head = await client.head(path)
    assert got.status_code == head.status_code == 200
    assert got.json()["object"] in ("list", "model")
    assert head.headers["content-type"] == got.headers["content-type"]
    assert head.headers["content-length"] == str(len(got.content))
    assert head.content == b""


async def test_head_on_a_hosted_image_gives_its_type_and_length():
    async with asgi_client(FluxProxy({}, environ={})) as client:
        created = await client.post(
            "/v1/images/generations", json={"prompt": "a fox", "size": "96x64"}
        )
        assert created.status_code == 200, created.text
        url = created.json()["data"][0]["url"]
        image = await client.get(url)
        head = await client.head(url)
    assert_image(image.content, "png", (96, 64))
    assert head.status_code == 200
    assert head.headers["content-type"] == "image/png"
    assert head.headers["content-length"] == str(len(image.content))
    assert head.content == b""


async def test_head_on_a_tampered_image_link_is_refused_like_get():
    async with asgi_client(FluxProxy({}, environ={})) as client:
        created = await client.post("/v1/images/generations", json={"prompt": "x", "size": "8x8"})
        tampered = httpx.URL(created.json()["data"][0]["url"]).copy_set_param("signature", "0")
        got = await client.get(tampered)
        head = await client.head(tampered)
    assert_openai_error(got, 403)
    assert head.status_code == 403
    assert head.content == b""


@pytest.mark.parametrize("path", ["/v1/models/", "/v1/images/generations/", "/v1/nothing", "/"])
async def test_other_paths_are_an_openai_404_not_a_redirect(path):
    async with asgi_client(FluxProxy({}, environ={})) as client:
        response = await client.get(path)
    assert assert_openai_error(response, 404)["code"] == "unknown_url"


async def test_the_api_prefix_is_configurable():
    async with asgi_client(
        FluxProxy({"server": {"api_prefix": "/openai/v1"}}, environ={})
    ) as client:
        listed = await client.get("/openai/v1/models")
        elsewhere = await client.get("/v1/models")
    assert listed.status_code == 200
    assert [entry["id"] for entry in listed.json()["data"]] == ["flux1.1-pro", "flux-pro-1.1"]
    assert assert_openai_error(elsewhere, 404)["code"] == "unknown_url"
