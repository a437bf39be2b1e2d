"""The provider machinery every plugin shares: redaction, size caps, checks, reports, config.

A hostile upstream speaking BFL's protocol (submit, poll the handed-back URL, fetch
the sample) echoes the provider key everywhere an upstream's text can travel: error
details, moderation reasons, the revised prompt, poll statuses, Retry-After. None
of it may reach the client. In process (httpx.ASGITransport); the emulators stand in
for the well-behaved upstreams.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from flux_proxy import FluxProxy
from flux_proxy.config import ConfigError
from flux_proxy.upstream import forwardable_retry_after, upstream_message
from flux_proxy_bfl.emulator import create_app as bfl_app
from flux_proxy_fal.emulator import create_app as fal_app
from flux_proxy_replicate.emulator import create_app as replicate_app
from tests.images import assert_image, make_image
from tests.in_process import generate
from tests.openapi import assert_openai_error

KEY = "sk-provider-0123456789abcdefSECRET"
UPSTREAM = "http://127.0.0.1:9200"
FAST_POLLS = {"poll_interval": 0.01, "poll_max_interval": 0.05}

PollAnswer = tuple[int, Any, dict[str, str]]


def hostile_bfl(polls: list[PollAnswer], submit: PollAnswer | None = None) -> Starlette:
    """BFL's protocol, with each poll's answer (status, JSON body, headers) scripted."""

    async def submit_task(request: Request) -> Response:
        if submit is not None:
            status, body, headers = submit
            return JSONResponse(body, status_code=status, headers=headers)
        base = str(request.base_url).rstrip("/")
        return JSONResponse({"id": "t1", "polling_url": f"{base}/v1/get_result?id=t1"})

    async def poll(request: Request) -> Response:
        status, body, headers = polls.pop(0) if len(polls) > 1 else polls[0]
        if isinstance(body, bytes):
            return Response(body, status_code=status, media_type="application/json")
        return JSONResponse(body, status_code=status, headers=headers)

    async def sample(request: Request) -> Response:
        return Response(make_image("png", (256, 256)), media_type="image/png")

    return Starlette(
        routes=[
            Route("/v1/flux-pro-1.1", submit_task, methods=["POST"]),
            Route("/v1/get_result", poll),
            Route("/sample.png", sample),
        ]
    )


def ready(**result: Any) -> PollAnswer:
    sample = f"{UPSTREAM}/sample.png"
    return (200, {"id": "t1", "status": "Ready", "result": {"sample": sample, **result}}, {})


def gateway(
    provider: str, upstream: Starlette, *, options: dict[str, Any] | None = None, **settings: Any
) -> FluxProxy:
    entry = {
        "provider": provider,
        "base_url": UPSTREAM,
        "api_key_env": "TEST_KEY",
        "options": {**FAST_POLLS, **(options or {})},
    }
    return FluxProxy(
        {"models": {"m": entry}, **settings},
        environ={"TEST_KEY": KEY},
        transport=httpx.ASGITransport(app=upstream),
    )


async def post(app: FluxProxy, **body: Any) -> httpx.Response:
    return await generate(app, **{"model": "m", "prompt": "a heron", "size": "256x256", **body})


def report(response: httpx.Response) -> dict[str, dict[str, str]]:
    return dict(json.loads(response.headers["x-flux-proxy-params"]))


# --- redaction -----------------------------------------------------------------------------


@pytest.mark.anyio
async def test_moderation_reasons_never_carry_the_key() -> None:
    details = {"Moderation Reasons": [f"flagged by {KEY}"]}
    upstream = hostile_bfl(
        [(200, {"id": "t1", "status": "Content Moderated", "details": details}, {})]
    )
    response = await post(gateway("bfl", upstream))
    error = assert_openai_error(response, 400)
    assert error["code"] == "content_policy_violation"
    assert "[redacted]" in error["message"]
    assert KEY not in response.text


@pytest.mark.anyio
async def test_a_key_cut_by_the_message_limit_is_redacted_before_the_cut() -> None:
    # The key straddles the 500-character limit of quoted upstream text: cut first, its
    # first half would survive a redaction that no longer matches.
    details = "x" * 490 + KEY + "y" * 100
    upstream = hostile_bfl([(200, {"id": "t1", "status": "Error", "details": details}, {})])
    response = await post(gateway("bfl", upstream))
    error = assert_openai_error(response, 502)
    assert KEY[:10] not in response.text
    assert "[redacted]" in error["message"]


def test_upstream_message_redacts_before_it_clips() -> None:
    answer = httpx.Response(400, json={"detail": "z" * 495 + KEY})
    message = upstream_message(answer, [KEY])
    assert KEY[:5] not in message
    assert len(message) <= 500


@pytest.mark.anyio
async def test_the_revised_prompt_and_streamed_progress_never_carry_the_key() -> None:
    pending: PollAnswer = (200, {"id": "t1", "status": f"Pending {KEY}", "progress": 0.5}, {})
    upstream = hostile_bfl([pending, ready(prompt=f"a heron, by {KEY}", seed=3)])
    app = gateway("bfl", upstream)
    response = await post(app, response_format="b64_json")
    assert response.status_code == 200, response.text
    item = response.json()["data"][0]
    assert item["revised_prompt"] == "a heron, by [redacted]"
    assert_image(base64.b64decode(item["b64_json"]), "png", (256, 256))

    upstream = hostile_bfl([pending, ready(prompt=f"a heron, by {KEY}", seed=3)])
    streamed = await post(gateway("bfl", upstream), stream=True)
    assert streamed.status_code == 200
    assert "Pending [redacted]" in streamed.text
    assert KEY not in streamed.text


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("retry_after", "forwarded"),
    [("7", "7"), ("Wed, 21 Oct 2026 07:28:00 GMT", "Wed, 21 Oct 2026 07:28:00 GMT"), (KEY, None)],
)
async def test_retry_after_is_forwarded_only_when_it_is_a_number_or_a_date(
    retry_after: str, forwarded: str | None
) -> None:
    throttled = (429, {"detail": f"slow down, {KEY}"}, {"Retry-After": retry_after})
    upstream = hostile_bfl([], submit=throttled)
    response = await post(gateway("bfl", upstream))
    assert_openai_error(response, 429)
    assert response.headers.get("retry-after") == forwarded
    assert KEY not in response.text and KEY not in str(response.headers)


@pytest.mark.parametrize(
    ("value", "forwarded"),
    [("0", "0"), (" 12 ", "12"), ("1.5", None), ("-1", None), ("soon", None), ("", None)],
)
def test_forwardable_retry_after(value: str, forwarded: str | None) -> None:
    assert forwardable_retry_after(value) == forwarded


# --- size caps -------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_a_poll_answer_over_the_cap_is_a_502() -> None:
    # With max_fetch_bytes at its floor the JSON cap is about 67 KB; this answer is 1 MB.
    padding = json.dumps({"id": "t1", "status": "Pending", "pad": "p" * 1_000_000}).encode()
    upstream = hostile_bfl([(200, padding, {})])
    response = await post(gateway("bfl", upstream, limits={"max_fetch_bytes": 1024}))
    error = assert_openai_error(response, 502)
    assert "larger than the gateway accepts" in error["message"]


def flood() -> Starlette:
    """An upstream whose every answer is 1 MB of JSON, for whatever is asked."""

    async def answer(request: Request) -> Response:
        return JSONResponse({"status": "starting", "pad": "p" * 1_000_000})

    return Starlette(routes=[Route("/{path:path}", answer, methods=["GET", "POST"])])


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("provider", "options"),
    [("bfl", {}), ("fal", {"mode": "sync"}), ("fal", {}), ("replicate", {}), ("openai", None)],
)
async def test_every_providers_first_answer_is_read_with_the_cap(
    provider: str, options: dict[str, Any] | None
) -> None:
    limits = {"max_fetch_bytes": 1024}
    if options is None:  # openai takes no polling options
        entry = {"provider": "openai", "base_url": UPSTREAM}
        transport = httpx.ASGITransport(app=flood())
        app = FluxProxy({"models": {"m": entry}, "limits": limits}, environ={}, transport=transport)
    else:
        app = gateway(provider, flood(), options=options, limits=limits)
    error = assert_openai_error(await post(app), 502)
    assert "larger than the gateway accepts" in error["message"]


# --- the provider's own checks run before a stream commits (defect 4) ------------------------


@pytest.mark.anyio
async def test_a_provider_refusal_is_a_400_before_the_stream_starts() -> None:
    upstream = bfl_app(api_key=KEY)
    response = await post(
        gateway("bfl", upstream), stream=True, webhook_url="https://hooks.example.com/x"
    )
    error = assert_openai_error(response, 400, param="webhook_url")
    assert "polls BFL itself" in error["message"]
    assert upstream.state.emulator.requests == []  # refused before anything was sent


# --- the report (defect 6) --------------------------------------------------------------------


@pytest.mark.anyio
async def test_fan_out_says_how_the_size_was_sent_once() -> None:
    upstream = bfl_app(api_key=KEY)
    response = await post(gateway("bfl", upstream), n=3, size="300x200")
    assert response.status_code == 200, response.text
    detail = report(response)["size"]["detail"]
    assert detail.count("sent as") == 1, detail
    assert len(upstream.state.emulator.submits) == 3


EMULATORS: dict[str, Callable[[], Starlette]] = {
    "bfl": lambda: bfl_app(api_key=KEY),
    "fal": lambda: fal_app(key=KEY),
    "replicate": lambda: replicate_app(api_key=KEY),
}


@pytest.mark.anyio
@pytest.mark.parametrize("provider", sorted(EMULATORS))
async def test_the_report_covers_only_what_the_client_sent(provider: str) -> None:
    response = await post(gateway(provider, EMULATORS[provider]()), response_format="b64_json")
    assert response.status_code == 200, response.text
    assert set(report(response)) == {"model", "prompt", "size", "response_format"}


# --- start-up -------------------------------------------------------------------------------


@pytest.mark.parametrize("provider", sorted(EMULATORS))
def test_an_unknown_upstream_model_is_the_same_config_error_for_every_provider(
    provider: str,
) -> None:
    settings = {"models": {"m": {"provider": provider, "upstream_model": "flux-9000"}}}
    with pytest.raises(ConfigError) as raised:
        FluxProxy(settings, environ={})
    assert str(raised.value).startswith(
        f"models.m: upstream_model: 'flux-9000' is not a model the {provider} provider knows"
    )


@pytest.mark.parametrize(
    ("options", "where"),
    [
        ({"response_format": "bogus"}, "options.response_format"),
        ({"send_seed": True}, "options.send_seed"),  # gone: capabilities.accepts_seed says it
        ({"trusted_hosts": ["*.com"]}, "options.trusted_hosts"),
    ],
)
def test_the_openai_providers_options_are_checked_at_start_up(
    options: dict[str, Any], where: str
) -> None:
    entry = {"provider": "openai", "base_url": UPSTREAM, "options": options}
    with pytest.raises(ConfigError, match=f"^models.m: {where}"):
        FluxProxy({"models": {"m": entry}}, environ={})
