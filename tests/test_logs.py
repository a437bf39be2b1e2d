"""Logged URLs carry no query: signed result links must not be readable from a log."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from flux_proxy.logs import UrlQueryFilter, log_url


@pytest.mark.parametrize(
    ("url", "logged"),
    [
        (
            "https://bfl.example/results/a/sample.png?se=2026&sp=r&sig=SECRET",
            "https://bfl.example/results/a/sample.png",
        ),
        ("https://user:pass@host.example:8443/v1?x=1#frag", "https://host.example:8443/v1"),
        ("http://[::1]:9101/files/x.png?signature=SECRET", "http://[::1]:9101/files/x.png"),
        ("/v1/images/files/x.png?expires=1&signature=SECRET", "/v1/images/files/x.png"),
        ("https://api.example", "https://api.example"),
        (httpx.URL("https://h.example/a?sig=SECRET"), "https://h.example/a"),
    ],
)
def test_log_url_drops_query_fragment_and_userinfo(url, logged):
    assert log_url(url) == logged


@pytest.fixture
def filtered() -> Iterator[None]:
    """The filter on httpx's and uvicorn's access loggers, as the CLI installs it."""
    url_filter = UrlQueryFilter()
    loggers = [logging.getLogger(name) for name in ("httpx", "uvicorn.access")]
    for target in loggers:
        target.addFilter(url_filter)
    try:
        yield
    finally:
        for target in loggers:
            target.removeFilter(url_filter)


@pytest.mark.anyio
async def test_httpx_request_lines_lose_the_query(filtered, caplog):
    async def file(request: Request) -> PlainTextResponse:
        return PlainTextResponse(request.query_params["sig"])

    app = Starlette(routes=[Route("/results/{name}", file)])
    caplog.set_level(logging.INFO, logger="httpx")
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://upstream.test"
    ) as http:
        response = await http.get("/results/sample.png?se=2026&sig=SECRET-SIG")
    assert response.text == "SECRET-SIG"  # the request itself kept its query
    assert "GET http://upstream.test/results/sample.png " in caplog.text
    assert "SECRET-SIG" not in caplog.text


def test_access_log_lines_lose_the_query(filtered, caplog):
    caplog.set_level(logging.INFO, logger="uvicorn.access")
    # The arguments uvicorn's access logger passes: client, method, target, version, status.
    logging.getLogger("uvicorn.access").info(
        '%s - "%s %s HTTP/%s" %d',
        "127.0.0.1:5000",
        "GET",
        "/v1/images/files/x.png?expires=1&signature=SECRET-SIG",
        "1.1",
        200,
    )
    assert '"GET /v1/images/files/x.png HTTP/1.1" 200' in caplog.text
    assert "SECRET-SIG" not in caplog.text
