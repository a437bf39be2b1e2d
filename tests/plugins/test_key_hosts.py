"""A provider key goes only to the provider's own hosts, whatever URL an upstream hands back.

Each emulator is told to hand out its follow-up URLs (BFL's polling_url, fal's
status/response/cancel URLs, Replicate's urls.get/cancel) on another host form of
itself, ``localhost``, which the address guard is told to allow: only the key-host
rule stands between the key and that host. In process (httpx.ASGITransport): the
protocol, not the socket, is the point here.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette

from flux_proxy import FluxProxy
from flux_proxy.config import ConfigError
from flux_proxy.hosts import KeyHosts
from flux_proxy_bfl.emulator import create_app as bfl_app
from flux_proxy_fal.emulator import create_app as fal_app
from flux_proxy_replicate.emulator import create_app as replicate_app
from tests.images import assert_image
from tests.in_process import generate
from tests.openapi import assert_openai_error

KEY = "provider-secret-0123456789abcdef"
UPSTREAM = "http://127.0.0.1:9100"
FOREIGN = "http://localhost:9100"
B64 = {"response_format": "b64_json"}
FAST_POLLS = {"poll_interval": 0.01, "poll_max_interval": 0.05}


@dataclass(frozen=True)
class Case:
    provider: str
    emulator: Callable[[str], Starlette]  # foreign base URL -> emulator app
    recorded: Callable[[Any], list[Any]]  # the emulator object -> its recorded requests
    key_header: str
    options: dict[str, Any]


CASES = [
    Case(
        "bfl",
        lambda base: bfl_app(api_key=KEY, polling_base=base),
        lambda emulator: emulator.requests,
        "x-key",
        {},
    ),
    Case(
        "fal",
        lambda base: fal_app(key=KEY, urls_base=base),
        lambda emulator: emulator.requests,
        "authorization",
        {},
    ),
    Case(
        "replicate",
        lambda base: replicate_app(api_key=KEY, urls_base=base),
        lambda emulator: emulator.records,
        "authorization",
        {"wait_seconds": 0},  # no Prefer: wait, so the prediction must be polled
    ),
]


def gateway(case: Case, upstream: Starlette, **options: Any) -> FluxProxy:
    entry = {
        "provider": case.provider,
        "base_url": UPSTREAM,
        "api_key_env": "TEST_KEY",
        "options": {**FAST_POLLS, **case.options, **options},
    }
    return FluxProxy(
        {"models": {"m": entry}, "fetch": {"allow_private_hosts": ["localhost"]}},
        environ={"TEST_KEY": KEY},
        transport=httpx.ASGITransport(app=upstream),
    )


async def post(app: FluxProxy) -> httpx.Response:
    return await generate(app, model="m", prompt="a heron", size="256x256", **B64)


def foreign_calls(case: Case, upstream: Starlette) -> list[Any]:
    return [
        r
        for r in case.recorded(upstream.state.emulator)
        if r.headers["host"].startswith("localhost")
    ]


@pytest.mark.anyio
@pytest.mark.parametrize("case", CASES, ids=lambda case: case.provider)
async def test_a_url_on_a_foreign_host_never_gets_the_key(case: Case) -> None:
    upstream = case.emulator(FOREIGN)
    response = await post(gateway(case, upstream))
    error = assert_openai_error(response, 502)
    assert "localhost" in error["message"] and "trusted_hosts" in error["message"]
    assert KEY not in response.text
    # The submission went to the configured upstream; nothing at all went to the foreign host.
    assert case.recorded(upstream.state.emulator), "the task was never submitted"
    assert foreign_calls(case, upstream) == []


@pytest.mark.anyio
@pytest.mark.parametrize("case", CASES, ids=lambda case: case.provider)
async def test_a_host_listed_in_trusted_hosts_is_followed_with_the_key(case: Case) -> None:
    upstream = case.emulator(FOREIGN)
    response = await post(gateway(case, upstream, trusted_hosts=["localhost"]))
    assert response.status_code == 200, response.text
    assert_image(base64.b64decode(response.json()["data"][0]["b64_json"]), "png", (256, 256))
    followed = foreign_calls(case, upstream)
    assert followed, "the handed-back URLs were not followed"
    # The polls (or status calls) carried the key; image downloads there go without it.
    assert any(KEY in call.headers.get(case.key_header, "") for call in followed)


@pytest.mark.parametrize(
    ("url", "allowed"),
    [
        ("https://queue.fal.run/fal-ai/flux-pro/requests/1", True),
        ("https://fal.run/x", True),
        ("https://queue.falrun.com/x", True),
        ("https://fal.run.example.com/x", False),
        ("https://notfal.run/x", False),
        ("http://127.0.0.1:9100/x", True),  # the configured base_url's origin
        ("http://127.0.0.1:9101/x", False),  # same host, another port: another service
        ("https://127.0.0.1:9100/x", False),  # another scheme
        ("ftp://queue.fal.run/x", False),
        ("https://mirror.example.org/x", True),  # listed in trusted_hosts
        ("https://a.mirror.example.org/x", False),
        ("https://cdn.example.net/x", True),  # below a *.domain pattern
        ("https://example.net/x", False),
    ],
)
def test_key_hosts_patterns(url: str, allowed: bool) -> None:
    hosts = KeyHosts(
        "fal",
        (
            "fal.run",
            "*.fal.run",
            "falrun.com",
            "*.falrun.com",
            "mirror.example.org",
            "*.example.net",
        ),
        UPSTREAM,
    )
    assert hosts.allows(url) is allowed


@pytest.mark.parametrize("bad", ["*", "*.com", "https://x.example.com", "x.example.com/path"])
def test_trusted_hosts_must_be_host_names_or_domain_patterns(bad: str) -> None:
    with pytest.raises(ConfigError, match="trusted_hosts"):
        gateway(CASES[1], fal_app(), trusted_hosts=[bad])
