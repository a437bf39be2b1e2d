"""The gateway's provider requests (flux_proxy/request_builder.py) are the ones
``httpx.AsyncClient.build_request`` makes with the same client: method, URL, every
header in order, body and timeout, whichever path builds them."""

from __future__ import annotations

import math
from typing import Any

import httpx
import pytest

from flux_proxy.config import Settings
from flux_proxy.request_builder import MAX_KEPT_URLS, RequestBuilder
from flux_proxy.runtime import Runtime

AUTH = {"Authorization": "Bearer sk-upstream"}


class _Text(str):
    """A str subclass (an enum of texts, say) whose JSON is the standard library's."""

    def __str__(self) -> str:
        return "not what JSON says"


CASES: list[tuple[str, str, dict[str, Any]]] = [
    ("POST", "http://127.0.0.1:8080/v1/images/generations", {"json": {"prompt": "a cat"}}),
    # Non-ASCII text, nested values, a port, a path that needs no quoting.
    (
        "POST",
        "https://api.example.com:8443/v1/images/generations",
        {"json": {"prompt": "un café, 東京", "n": 2, "extra": {"seed": None, "x": [1.5, True]}}},
    ),
    ("POST", "http://up.test/predictions", {"json": {}, "headers": {"Prefer": "wait"}}),
    ("POST", "http://up.test/cancel", {}),  # no body: Content-Length 0
    ("PUT", "http://up.test/requests/1/cancel", {}),
    ("GET", "http://up.test/requests/1/status", {}),
    # A query, quoting, userinfo: as httpx encodes them.
    ("GET", "https://user:pw@up.test/a%20b/c?x=1&y=%2F", {}),
    # Merged by httpx itself: query params, a header the client sets too, two spellings.
    ("GET", "http://up.test/poll?id=1", {"params": {"logs": "1"}}),
    ("POST", "http://up.test/run", {"json": {"a": 1}, "headers": {"accept": "image/png"}}),
    ("POST", "http://up.test/run", {"json": {"a": 1}, "headers": {"content-type": "text/x"}}),
    ("POST", "http://up.test/run", {"headers": {"x-a": "1", "X-A": "2"}}),
    # Bodies orjson does not write as the standard library does, written as it does:
    # an integer past 64 bits, a key that is not text, a str subclass, a null in text.
    ("POST", "http://up.test/run", {"json": {"seed": 2**64 + 1, "n": 2**63}}),
    ("POST", "http://up.test/run", {"json": {"extra": {1: "a", "t": "null"}}}),
    ("POST", "http://up.test/run", {"json": {"style": _Text("vivid"), "u": "\u2028\x7f"}}),
]


def _seen(request: httpx.Request) -> tuple[Any, ...]:
    return (
        request.method,
        str(request.url),
        (request.url.raw_scheme, request.url.raw_host, request.url.port, request.url.raw_path),
        request.headers.raw,
        request.content,
        request.extensions,
    )


@pytest.fixture
def runtime() -> Runtime:
    return Runtime(Settings(), environ={})


@pytest.mark.parametrize("keep_url", [True, False])
@pytest.mark.parametrize(("method", "url", "options"), CASES)
def test_requests_are_the_ones_httpx_builds(
    runtime: Runtime, method: str, url: str, options: dict[str, Any], keep_url: bool
) -> None:
    headers = {**AUTH, **options.pop("headers", {})}
    expected = runtime.http.build_request(method, url, headers=headers, **options)
    for _ in range(2):  # a kept URL is reused the second time
        built = runtime.build_request(method, url, headers=headers, keep_url=keep_url, **options)
        assert _seen(built) == _seen(expected)


def test_a_body_httpx_refuses_is_refused_the_same(runtime: Runtime) -> None:
    for value in (math.nan, -math.inf, {1, 2}, b"bytes"):
        with pytest.raises((ValueError, TypeError)) as built:
            runtime.build_request("POST", "http://up.test/", json={"x": value}, headers=AUTH)
        with pytest.raises((ValueError, TypeError)) as expected:
            runtime.http.build_request("POST", "http://up.test/", json={"x": value}, headers=AUTH)
        assert built.type is expected.type


def test_a_client_with_a_base_url_is_merged_by_httpx() -> None:
    http = httpx.AsyncClient(base_url="http://up.test/v1", headers={"x-client": "1"})
    built = RequestBuilder(http)("POST", "/images", json={"a": 1}, headers=AUTH)
    assert _seen(built) == _seen(http.build_request("POST", "/images", json={"a": 1}, headers=AUTH))
    assert str(built.url) == "http://up.test/v1/images"


def test_kept_urls_stay_bounded(runtime: Runtime) -> None:
    build = runtime.build_request
    for index in range(MAX_KEPT_URLS * 2 + 1):
        url = f"http://up.test/{index}"
        assert str(build("GET", url, headers=AUTH, keep_url=True).url) == url
    assert len(build._urls) <= MAX_KEPT_URLS
