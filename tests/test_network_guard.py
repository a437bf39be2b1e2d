"""The network the gateway runs in stays closed, over real loopback connections:
credentials in a URL are never sent, a DNS name cannot rebind between the address
check and the connection, and a stale keep-alive connection costs an idempotent GET
one retry and a POST none."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from starlette.types import Receive, Scope, Send

from flux_proxy.config import Settings
from flux_proxy.runtime import Runtime
from tests.openapi import assert_openai_error
from tests.upstream_openai import RecordingUpstream, gateway_config


class HeaderRecorder:
    """Answers 200 ``ok`` to anything; keeps every request's headers."""

    def __init__(self) -> None:
        self.headers: list[dict[str, str]] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.headers.append({k.decode(): v.decode() for k, v in scope["headers"]})
        while (await receive()).get("more_body"):
            pass
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})


def generate(gateway: str, **body: Any) -> httpx.Response:
    payload = {"model": "up", "prompt": "x", "size": "16x16", "response_format": "b64_json"}
    return httpx.post(f"{gateway}/v1/images/generations", json={**payload, **body}, timeout=30)


# --- credentials in a URL ---------------------------------------------------------------


def test_an_image_url_with_credentials_is_refused_and_never_requested(
    serve_upstream, start_gateway
):
    recorder = RecordingUpstream()
    url = serve_upstream(recorder.app())
    # The upstream's own (trusted) origin, with user:pass@ written into the answer.
    recorder.url_base = url.replace("http://", "http://user:secret@")
    response = generate(start_gateway(gateway_config(url)))
    error = assert_openai_error(response, 502)
    assert "credentials" in error["message"], error
    assert "secret" not in response.text
    assert recorder.downloads == []


@pytest.mark.anyio
async def test_the_client_never_turns_userinfo_into_an_authorization_header(serve_upstream):
    """Whatever path a URL with user:pass@ takes, the host sees no Authorization."""
    recorder = HeaderRecorder()
    url = serve_upstream(recorder)
    runtime = Runtime(Settings(), environ={})
    try:
        answer = await runtime.http.get(url.replace("http://", "http://user:secret@") + "/x")
    finally:
        await runtime.aclose()
    assert answer.status_code == 200
    assert [headers.get("authorization") for headers in recorder.headers] == [None]
