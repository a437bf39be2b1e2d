"""Hosted-image links come from ``server.public_url`` or from a Host the operator
listed in ``server.allowed_hosts``; a request with another Host gets no link (400,
before any upstream call) and b64_json answers as ever. Over real loopback."""

from __future__ import annotations

from typing import Any

import httpx

from tests.images import assert_image
from tests.openapi import assert_openai_error
from tests.upstream_openai import RecordingUpstream, gateway_config


def generate(gateway: str, host: str, **body: Any) -> httpx.Response:
    payload = {"model": "up", "prompt": "x", "size": "16x16", "response_format": "url"}
    return httpx.post(
        f"{gateway}/v1/images/generations",
        json={**payload, **body},
        headers={"Host": host},
        timeout=30,
    )


def config(url: str, **server: Any) -> dict[str, Any]:
    settings = gateway_config(url, "b64_json")
    settings["server"] = server
    return settings


def test_a_listed_host_gets_links_on_itself(serve_upstream, start_gateway):
    recorder = RecordingUpstream()
    gateway = start_gateway(
        config(serve_upstream(recorder.app()), allowed_hosts=["images.test", "*.example.test"])
    )
    port = httpx.URL(gateway).port
    for host in (f"images.test:{port}", "a.b.example.test"):
        response = generate(gateway, host)
        assert response.status_code == 200, response.text
        link = httpx.URL(response.json()["data"][0]["url"])
        assert link.netloc.decode() == host
        # The link works when the client reaches that host (here: the same gateway).
        fetched = httpx.get(str(link.copy_with(host="127.0.0.1", port=port)))
        assert_image(fetched.content, "png", (16, 16))


def test_another_host_gets_no_link_and_no_upstream_call(serve_upstream, start_gateway):
    recorder = RecordingUpstream()
    gateway = start_gateway(config(serve_upstream(recorder.app()), allowed_hosts=["images.test"]))
    for host in ("evil.test", "images.test.evil.test", "[::1", "example.test"):
        error = assert_openai_error(generate(gateway, host), 400)
        assert error["code"] == "untrusted_host", error
    assert recorder.requests == []
    # No link needed, no Host needed: b64_json answers whatever the Host.
    answer = generate(gateway, "evil.test", response_format="b64_json")
    assert answer.status_code == 200, answer.text
    assert "url" not in answer.json()["data"][0] or answer.json()["data"][0]["url"] is None


def test_public_url_wins_over_any_host(serve_upstream, start_gateway):
    recorder = RecordingUpstream()
    gateway = start_gateway(
        config(
            serve_upstream(recorder.app()),
            public_url="https://images.example.test",
            allowed_hosts=["images.test"],
        )
    )
    response = generate(gateway, "evil.test")
    assert response.status_code == 200, response.text
    assert response.json()["data"][0]["url"].startswith(
        "https://images.example.test/v1/images/files/"
    )


def test_each_host_keeps_its_own_answer_request_after_request(serve_upstream, start_gateway):
    """The gateway works a Host's link base out once: a listed and an unlisted Host,
    alternating, each get theirs every time, and more Hosts than it keeps change nothing."""
    gateway = start_gateway(
        config(serve_upstream(RecordingUpstream().app()), allowed_hosts=["*.images.test"])
    )
    hosts = [f"h{i}.images.test" for i in range(70)]
    for round_ in range(2):
        for host in hosts[:2] if round_ else hosts:
            response = generate(gateway, host)
            assert response.status_code == 200, response.text
            assert httpx.URL(response.json()["data"][0]["url"]).host == host
        error = assert_openai_error(generate(gateway, "evil.test"), 400)
        assert error["code"] == "untrusted_host", error
