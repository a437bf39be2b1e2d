"""The HTTP edge: which requests are the gateway's, their methods, HEAD and the rest.

In process (httpx.ASGITransport): routing is the point, not the socket. ASGITransport
passes on whatever body the app sends, so a HEAD answer here shows the app's own.
"""

from __future__ import annotations

import base64
import logging
import re
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
from starlette.types import Message

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


def never_called(request: httpx.Request) -> httpx.Response:
    raise AssertionError("the upstream must not get a half-sent body")


@pytest.mark.parametrize(
    ("path", "config"),
    [
        ("/v1/images/generations", {}),
        ("/v1/chat/completions", {"forward": {"base_url": "http://upstream.test"}}),
    ],
)
async def test_a_client_leaving_mid_body_is_an_info_log_not_a_500(caplog, path, config):
    """The server tells the app by an http.disconnect where the next body chunk would be."""
    messages: Iterator[Message] = iter(
        [
            {"type": "http.request", "body": b'{"prompt": "a f', "more_body": True},
            {"type": "http.disconnect"},
        ]
    )
    sent: list[Message] = []

    async def receive() -> Message:
        return next(messages)

    async def send(message: Message) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"gateway.test"), (b"content-length", b"1000")],
        "client": ("127.0.0.1", 5000),
        "server": ("127.0.0.1", 8080),
    }
    gateway = FluxProxy(config, environ={}, transport=httpx.MockTransport(never_called))
    with caplog.at_level(logging.INFO, logger="flux_proxy"):
        await gateway(scope, receive, send)
    assert sent == []  # nobody is left to answer
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert any("disconnected while sending its body" in r.getMessage() for r in caplog.records)
    # The access line gives the status as "-> NNN"; the request id beside it is random
    # hex, which may hold "500" (a bare substring check failed 1 run in ~150).
    statuses = [m for r in caplog.records for m in re.findall(r"-> (\d{3})\b", r.getMessage())]
    assert set(statuses) <= {"499"}, statuses  # the forwarder logs no access line here


@pytest.mark.parametrize(
    "body",
    [
        '{"prompt": "a fox", "size": "16x16"}'.encode("utf-16"),
        b"\xef\xbb\xbf" + b'{"prompt": "a fox", "size": "16x16"}',
        b'{"prompt": "a fox", "size": "16x16", "seed": 123456789012345678901234567890}',
        b'{"prompt": "a fox", "size": "16x16", "x": {"seed": 123456789012345678901234567890}}',
    ],
    ids=["utf-16", "utf-8 with BOM", "integer past 64 bits", "integer past 64 bits, nested"],
)
async def test_json_the_fast_parser_refuses_is_read_as_it_always_was(body):
    async with asgi_client(FluxProxy({}, environ={})) as client:
        response = await client.post("/v1/images/generations", content=body)
    assert response.status_code == 200, response.text
    assert len(response.json()["data"]) == 1


async def test_nan_is_read_as_json_and_refused_as_a_value():
    async with asgi_client(FluxProxy({}, environ={})) as client:
        response = await client.post(
            "/v1/images/generations", content=b'{"prompt": "x", "seed": NaN}'
        )
    assert assert_openai_error(response, 400, "seed")["message"].startswith("Invalid value")


async def test_a_body_in_several_messages_is_read_whole():
    """Several ``http.request`` messages, as a slow client's body reaches the app."""
    body = b'{"prompt": "a fox", "size": "16x16", "response_format": "b64_json"}'

    async def pieces() -> AsyncIterator[bytes]:
        for start in range(0, len(body), 7):
            yield body[start : start + 7]

    async with asgi_client(FluxProxy({}, environ={})) as client:
        response = await client.post("/v1/images/generations", content=pieces())
    assert response.status_code == 200, response.text
    image = base64.b64decode(response.json()["data"][0]["b64_json"])
    assert_image(image, "png", (16, 16))
