"""The fal plugin end to end: gateway -> fal provider -> fal emulator, over loopback HTTP."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx
import openai
import pytest

from flux_proxy.config import ConfigError
from flux_proxy_fal.emulator import FalEmulator, Recorded, create_app
from tests.images import assert_image, inline_jpeg_base64
from tests.openapi import assert_openai_error
from tests.servers import ServeUpstream
from tests.sse import stream_events
from tests.waiting import wait_for

KEY = "fal-secret-0123456789abcdef"
V11 = "fal-ai/flux-pro/v1.1"
ULTRA = "fal-ai/flux-pro/v1.1-ultra"
FAST_POLLS = {"poll_interval": 0.01, "poll_max_interval": 0.05}


@dataclass
class Fal:
    emulator: FalEmulator
    url: str

    def submits(self) -> list[Recorded]:
        return [r for r in self.emulator.requests if r.method == "POST"]

    def body(self, index: int = 0) -> Any:
        return self.submits()[index].body

    def wait_for(self, method: str, path_part: str, timeout: float = 5.0) -> list[Recorded]:
        """The matching requests, once there is one (bounded wait: the gateway works async)."""
        wait_for(lambda: bool(self.emulator.calls(method, path_part)), timeout)
        return self.emulator.calls(method, path_part)


@pytest.fixture
def fal(serve_upstream: ServeUpstream) -> Fal:
    """A fresh emulator for the test, on the session's shared loopback server."""
    app = create_app(key=KEY, polls_before_ready=2)
    return Fal(app.state.emulator, serve_upstream(app))


def settings(
    url: str, *, upstream_model: str = V11, options: dict[str, Any] | None = None, **entry: Any
) -> dict[str, Any]:
    model = {
        "provider": "fal",
        "upstream_model": upstream_model,
        "base_url": url,
        "api_key_env": "FAL_TEST_KEY",
        "options": {**FAST_POLLS, **(options or {})},
        **entry,
    }
    return {"models": {"flux-fal": model}}


@pytest.fixture
def gateway(fal: Fal, start_gateway: Callable[..., str]) -> str:
    return str(start_gateway(settings(fal.url), environ={"FAL_TEST_KEY": KEY}))


def client(gateway: str, **options: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway}/v1", api_key="x", max_retries=0, **options)


def post(gateway: str, **body: Any) -> httpx.Response:
    return httpx.post(
        f"{gateway}/v1/images/generations",
        json={"model": "flux-fal", "prompt": "a kestrel", "size": "256x256", **body},
        timeout=30,
    )


def report(response: Any) -> dict[str, dict[str, str]]:
    headers = response.headers
    return dict(json.loads(headers["x-flux-proxy-params"]))


# --- the queue protocol ---------------------------------------------------------------------


def test_queue_round_trip_sends_fal_native_fields_and_follows_the_returned_urls(
    fal: Fal, gateway: str
) -> None:
    raw = client(gateway).images.with_raw_response.generate(
        model="flux-fal",
        prompt="a kestrel",
        size="1024x768",
        n=2,
        output_format="png",
        response_format="b64_json",
        extra_body={"seed": 7, "safety_tolerance": 5, "enhance_prompt": True},
    )
    data = raw.parse().data or []
    assert len(data) == 2
    for item in data:
        assert_image(base64.b64decode(item.b64_json or ""), "png", (1024, 768))

    submit = fal.submits()
    assert len(submit) == 1
    assert submit[0].path == f"/{V11}"
    assert submit[0].headers["authorization"] == f"Key {KEY}"
    assert submit[0].body == {
        "prompt": "a kestrel",
        "image_size": "landscape_4_3",
        "num_images": 2,
        "seed": 7,
        "output_format": "png",
        "safety_tolerance": "5",  # a string enum at fal
        "enhance_prompt": True,
    }

    # Polling used exactly the URLs fal handed out: owner/app only, no /v1.1 sub-path.
    (queued,) = fal.emulator.queue.values()
    status_url = f"{fal.url}/fal-ai/flux-pro/requests/{queued.request_id}/status"
    polls = fal.emulator.calls("GET", "/status")
    assert [p.url for p in polls] == [status_url] * 3  # IN_QUEUE, IN_PROGRESS, COMPLETED
    assert all(p.headers["authorization"] == f"Key {KEY}" for p in polls)
    results = [r for r in fal.emulator.calls("GET") if r.path.endswith(queued.request_id)]
    assert [r.url for r in results] == [status_url.removesuffix("/status")]
    assert fal.emulator.calls("PUT") == []

    params = report(raw)
    assert params["size"] == {
        "handling": "converted",
        "detail": 'sent as image_size="landscape_4_3"',
    }
    assert params["n"] == {"handling": "renamed", "detail": "sent as num_images"}
    assert params["safety_tolerance"]["handling"] == "converted"
    assert "'5'" in params["safety_tolerance"]["detail"]
    assert params["enhance_prompt"]["handling"] == "passthrough"
    assert params["seed"]["handling"] == "passthrough"
    assert params["prompt"]["handling"] == "passthrough"
    assert "fal" in params["model"]["detail"]
    assert raw.headers["x-flux-proxy-provider"] == "fal"


def test_custom_size_goes_as_width_height_and_the_url_response_is_hosted(
    fal: Fal, gateway: str
) -> None:
    raw = client(gateway).images.with_raw_response.generate(
        model="flux-fal", prompt="a kestrel", size="256x256", output_format="jpeg"
    )
    (item,) = raw.parse().data or []
    assert item.url and item.url.startswith(gateway)  # the gateway hosts it, not fal's CDN
    assert_image(httpx.get(item.url).content, "jpeg", (256, 256))
    assert fal.body()["image_size"] == {"width": 256, "height": 256}
    assert fal.body()["output_format"] == "jpeg"
    # The gateway fetched fal's signed file URL.
    (fetched,) = fal.emulator.calls("GET", "/files/")
    assert "signature=" in fetched.url and "expires=" in fetched.url
    assert report(raw)["size"]["handling"] == "converted"


def test_fal_native_size_fields_from_the_client_do_not_beat_size(fal: Fal, gateway: str) -> None:
    response = post(gateway, image_size="portrait_16_9", num_images=3)
    assert response.status_code == 200, response.text
    assert (fal.body()["image_size"], fal.body()["num_images"]) == (
        {"width": 256, "height": 256},
        1,
    )
    params = report(response)
    assert params["image_size"]["handling"] == "ignored"
    assert "from size" in params["image_size"]["detail"]
    assert params["num_images"]["handling"] == "ignored"


def test_a_size_flux_cannot_make_is_asked_nearest_and_resized(fal: Fal, gateway: str) -> None:
    response = post(gateway, size="300x200", output_format="webp", response_format="b64_json")
    assert response.status_code == 200, response.text
    assert_image(base64.b64decode(response.json()["data"][0]["b64_json"]), "webp", (300, 200))
    # Within 256-1440 and a multiple of 32, same shape.
    assert fal.body()["image_size"] == {"width": 384, "height": 256}
    assert fal.body()["output_format"] == "png"  # webp is not native: lossless, then transcoded
    size = report(response)["size"]
    assert size["handling"] == "emulated"
    assert "384x256" in size["detail"] and "image_size=" in size["detail"]


def test_n_beyond_four_is_split_into_calls_with_consecutive_seeds(fal: Fal, gateway: str) -> None:
    response = post(gateway, n=6, seed=10, response_format="b64_json")
    assert response.status_code == 200, response.text
    assert len(response.json()["data"]) == 6
    sent = sorted((r.body["num_images"], r.body["seed"]) for r in fal.submits())
    assert sent == [(2, 14), (4, 10)]
    params = report(response)
    assert params["n"]["handling"] == "emulated"
    assert params["seed"]["handling"] == "emulated"


def test_ultra_takes_an_aspect_ratio(fal: Fal, start_gateway: Callable[..., str]) -> None:
    gateway = start_gateway(settings(fal.url, upstream_model=ULTRA), environ={"FAL_TEST_KEY": KEY})
    response = post(gateway, size="1376x768", output_format="jpeg", response_format="b64_json")
    assert response.status_code == 200, response.text
    assert_image(base64.b64decode(response.json()["data"][0]["b64_json"]), "jpeg", (1376, 768))
    body = fal.body()
    assert fal.submits()[0].path == f"/{ULTRA}"
    assert body["aspect_ratio"] == "16:9"
    assert "image_size" not in body
    assert 'aspect_ratio="16:9"' in report(response)["size"]["detail"]


def test_polling_reports_progress_to_a_streaming_client(fal: Fal, gateway: str) -> None:
    fal.emulator.polls_before_ready = 4
    events = stream_events(
        gateway, {"model": "flux-fal", "prompt": "x", "size": "256x256", "stream": True}, timeout=30
    )
    progress = [e for e in events if e["type"] == "flux_proxy.progress"]
    assert [e["status"] for e in progress] == [
        "IN_QUEUE",  # the submit answer
        "IN_QUEUE",
        "IN_QUEUE",
        "IN_PROGRESS",
        "IN_PROGRESS",
        "COMPLETED",
    ]
    assert [e["queue_position"] for e in progress[:3]] == [2, 1, 0]
    assert all(e["provider"] == "fal" for e in progress)
    assert progress[-1]["progress"] == 1.0
    assert [e["type"] for e in events[-2:]] == ["image_generation.completed", "flux_proxy.report"]


def test_polling_honours_retry_after(fal: Fal, start_gateway: Callable[..., str]) -> None:
    # Own backoff of a minute: the request can only finish in time by following fal's hint.
    options = {"poll_interval": 60, "poll_max_interval": 60}
    config = settings(fal.url, options=options)
    config["limits"] = {"request_timeout": 20}
    gateway = start_gateway(config, environ={"FAL_TEST_KEY": KEY})
    fal.emulator.retry_after = "0"
    fal.emulator.poll_rate_limits = 1  # the first poll is a 429 with Retry-After too
    fal.emulator.rate_limit_retry_after = "0"
    response = post(gateway)
    assert response.status_code == 200, response.text
    assert len(fal.emulator.calls("GET", "/status")) == 4  # one 429, then 202, 202, 200


def test_status_logs_are_asked_for_when_configured(
    fal: Fal, start_gateway: Callable[..., str]
) -> None:
    config = settings(fal.url, options={"logs": True})
    gateway = start_gateway(config, environ={"FAL_TEST_KEY": KEY})
    assert post(gateway).status_code == 200
    polls = fal.emulator.calls("GET", "/status")
    assert polls and all(p.query == {"logs": "1"} for p in polls)


# --- the sync protocol ------------------------------------------------------------------------


def test_sync_mode_posts_once_and_gets_the_output(
    fal: Fal, start_gateway: Callable[..., str]
) -> None:
    config = settings(f"{fal.url}/sync", options={"mode": "sync"})
    gateway = start_gateway(config, environ={"FAL_TEST_KEY": KEY})
    response = post(gateway, size="512x512", output_format="jpeg", response_format="b64_json")
    assert response.status_code == 200, response.text
    assert_image(base64.b64decode(response.json()["data"][0]["b64_json"]), "jpeg", (512, 512))
    (call,) = fal.submits()
    assert call.path == f"/sync/{V11}"
    assert call.body["image_size"] == "square"
    assert fal.emulator.calls("GET", "/status") == []
    assert fal.emulator.queue == {}


@pytest.mark.parametrize("mode", ["queue", "sync"])
def test_client_sync_mode_returns_inline_images_that_are_decoded(
    fal: Fal, start_gateway: Callable[..., str], mode: str
) -> None:
    base = fal.url if mode == "queue" else f"{fal.url}/sync"
    gateway = start_gateway(settings(base, options={"mode": mode}), environ={"FAL_TEST_KEY": KEY})
    response = post(gateway, n=2, output_format="jpeg", sync_mode=True)
    assert response.status_code == 200, response.text
    for item in response.json()["data"]:
        assert_image(httpx.get(item["url"]).content, "jpeg", (256, 256))
    assert fal.body()["sync_mode"] is True
    assert fal.emulator.calls("GET", "/files/") == []  # nothing to fetch: the bytes came inline
    assert report(response)["sync_mode"]["handling"] == "passthrough"


def test_sync_mode_base64_is_passed_on_as_fal_wrote_it(fal: Fal, gateway: str) -> None:
    written: list[str] = []

    def inline(data: bytes) -> str:
        written.append(inline_jpeg_base64(data))  # valid, but no encoder writes it
        return written[-1]

    fal.emulator.inline_base64 = inline
    response = post(gateway, n=2, output_format="jpeg", response_format="b64_json", sync_mode=True)
    assert response.status_code == 200, response.text
    passed_on = [item["b64_json"] for item in response.json()["data"]]
    assert passed_on == written  # not decoded and encoded again
    for text in passed_on:
        assert_image(base64.b64decode(text), "jpeg", (256, 256))


def test_a_truncated_inline_image_is_a_502_that_says_so(fal: Fal, gateway: str) -> None:
    fal.emulator.inline_base64 = lambda data: base64.b64encode(data[:-40]).decode()
    for response_format in ("b64_json", "url"):
        response = post(
            gateway, output_format="jpeg", response_format=response_format, sync_mode=True
        )
        error = assert_openai_error(response, 502)
        assert "truncated jpeg image" in error["message"], error


# --- moderation and validation ---------------------------------------------------------------


@pytest.mark.parametrize("mode", ["queue", "sync"])
def test_fal_content_policy_422_is_content_policy_violation(
    fal: Fal, start_gateway: Callable[..., str], mode: str
) -> None:
    base = fal.url if mode == "queue" else f"{fal.url}/sync"
    gateway = start_gateway(settings(base, options={"mode": mode}), environ={"FAL_TEST_KEY": KEY})
    response = post(gateway, prompt="please moderate this")
    error = assert_openai_error(response, 400)
    assert error["code"] == "content_policy_violation"
    assert "content checker" in error["message"]


def test_nsfw_flagged_images_are_refused_unless_the_checker_is_off(fal: Fal, gateway: str) -> None:
    error = assert_openai_error(post(gateway, prompt="nsfw scene", n=2), 400)
    assert error["code"] == "content_policy_violation"
    assert "2 of 2" in error["message"]

    response = post(gateway, prompt="nsfw scene", enable_safety_checker=False)
    assert response.status_code == 200, response.text
    assert fal.body(1)["enable_safety_checker"] is False


@pytest.mark.parametrize(
    ("capabilities", "body", "param", "native"),
    [
        # The gateway is told to allow sizes fal (FLUX) refuses: fal's 422 names image_size.
        ({"sizes": {"min_side": 64, "multiple_of": 16}}, {"size": "128x128"}, "size", None),
        ({"max_images_per_call": 8}, {"n": 5}, "n", None),
        # With the declared range removed, fal's own enum check answers.
        ({"fields": {"safety_tolerance": {"type": "string"}}}, {"safety_tolerance": 9}, None, None),
        # BFL's name for the field: fal's error on enhance_prompt names what the client sent.
        (
            {"fields": {"prompt_upsampling": "enhance_prompt"}},
            {"prompt_upsampling": "yes"},
            "prompt_upsampling",
            "enhance_prompt",
        ),
    ],
)
def test_fal_validation_errors_name_the_public_field(
    fal: Fal,
    start_gateway: Callable[..., str],
    capabilities: dict[str, Any],
    body: dict[str, Any],
    param: str | None,
    native: str | None,
) -> None:
    config = settings(fal.url, capabilities=capabilities)
    gateway = start_gateway(config, environ={"FAL_TEST_KEY": KEY})
    response = post(gateway, **body)
    expected = param or next(iter(body))
    error = assert_openai_error(response, 400, param=expected)
    assert error["code"] is None or error["code"] != "content_policy_violation"
    assert KEY not in response.text
    if native:
        assert native in error["message"]


def test_out_of_range_fields_are_refused_before_calling_fal(fal: Fal, gateway: str) -> None:
    error = assert_openai_error(post(gateway, safety_tolerance=0), 400, param="safety_tolerance")
    assert "1 to 6" in error["message"]
    assert fal.emulator.requests == []


# --- upstream failures ---------------------------------------------------------------------------


def test_wrong_key_is_a_502_that_never_shows_the_key(
    fal: Fal, start_gateway: Callable[..., str]
) -> None:
    wrong = "fal-wrong-key-9876543210"
    gateway = start_gateway(settings(fal.url), environ={"FAL_TEST_KEY": wrong})
    response = post(gateway)
    error = assert_openai_error(response, 502)
    assert error["code"] == "upstream_auth_failed"
    assert wrong not in response.text
    assert fal.submits()[0].headers["authorization"] == f"Key {wrong}"


def test_missing_key_names_the_variable(fal: Fal, start_gateway: Callable[..., str]) -> None:
    config = settings(fal.url)
    del config["models"]["flux-fal"]["api_key_env"]  # the default variable: FAL_KEY
    gateway = start_gateway(config, environ={})
    error = assert_openai_error(post(gateway), 502)
    assert error["code"] == "upstream_credentials_missing"
    assert "FAL_KEY" in error["message"]
    assert fal.emulator.requests == []


def test_the_default_key_variable_is_fal_key(fal: Fal, start_gateway: Callable[..., str]) -> None:
    config = settings(fal.url)
    del config["models"]["flux-fal"]["api_key_env"]
    gateway = start_gateway(config, environ={"FAL_KEY": KEY})
    assert post(gateway).status_code == 200


def test_rate_limit_is_429_with_retry_after(fal: Fal, gateway: str) -> None:
    fal.emulator.rate_limited = True
    fal.emulator.rate_limit_retry_after = "17"
    response = post(gateway)
    error = assert_openai_error(response, 429)
    assert error["code"] == "rate_limit_exceeded"
    assert response.headers["retry-after"] == "17"


@pytest.mark.parametrize("mode", ["queue", "sync"])
@pytest.mark.parametrize(
    ("error_type", "status", "code"),
    [
        ("request_timeout", 504, "upstream_timeout"),
        ("runner_scheduling_failure", 502, "upstream_error"),
        ("internal_error", 502, "upstream_error"),
    ],
)
def test_fal_infrastructure_errors(
    fal: Fal,
    start_gateway: Callable[..., str],
    mode: str,
    error_type: str,
    status: int,
    code: str,
) -> None:
    base = fal.url if mode == "queue" else f"{fal.url}/sync"
    gateway = start_gateway(settings(base, options={"mode": mode}), environ={"FAL_TEST_KEY": KEY})
    fal.emulator.infra_error = error_type
    error = assert_openai_error(post(gateway), status)
    assert error["code"] == code
    assert error_type in error["message"]


def test_a_failed_infrastructure_call_fails_over_to_the_next_provider(
    fal: Fal, start_gateway: Callable[..., str]
) -> None:
    entry = settings(fal.url)["models"]["flux-fal"]
    config = {"models": {"flux-fal": {"providers": [entry, {"provider": "local"}]}}}
    gateway = start_gateway(config, environ={"FAL_TEST_KEY": KEY})
    fal.emulator.infra_error = "runner_scheduling_failure"
    response = post(gateway)
    assert response.status_code == 200, response.text
    assert response.headers["x-flux-proxy-provider"] == "local"
    assert "fal (upstream_error) failed" in report(response)["model"]["detail"]


# --- cancellation and deadlines ----------------------------------------------------------------


def test_a_client_that_goes_away_cancels_the_fal_request(fal: Fal, gateway: str) -> None:
    fal.emulator.polls_before_ready = 10**6
    with pytest.raises(openai.APITimeoutError):
        client(gateway, timeout=1.0).images.generate(model="flux-fal", prompt="x", size="256x256")
    (cancel,) = fal.wait_for("PUT", "/cancel")
    (queued,) = fal.emulator.queue.values()
    assert cancel.url == f"{fal.url}/fal-ai/flux-pro/requests/{queued.request_id}/cancel"
    assert cancel.headers["authorization"] == f"Key {KEY}"
    assert queued.cancelled


def test_the_gateway_deadline_cancels_the_fal_request(
    fal: Fal, start_gateway: Callable[..., str]
) -> None:
    config = settings(fal.url)
    config["limits"] = {"request_timeout": 1}
    gateway = start_gateway(config, environ={"FAL_TEST_KEY": KEY})
    fal.emulator.polls_before_ready = 10**6
    error = assert_openai_error(post(gateway), 504)
    assert error["code"] == "upstream_timeout"
    assert fal.wait_for("PUT", "/cancel")


def test_poll_timeout_gives_504_and_cancels(fal: Fal, start_gateway: Callable[..., str]) -> None:
    gateway = start_gateway(
        settings(fal.url, options={"poll_timeout": 0.5}), environ={"FAL_TEST_KEY": KEY}
    )
    fal.emulator.polls_before_ready = 10**6
    error = assert_openai_error(post(gateway), 504)
    assert error["code"] == "upstream_timeout"
    assert "0.5 seconds" in error["message"]
    assert fal.wait_for("PUT", "/cancel")


# --- configuration -----------------------------------------------------------------------------


def test_bad_options_fail_at_startup(fal: Fal) -> None:
    from flux_proxy import FluxProxy

    with pytest.raises(ConfigError, match="mode"):
        FluxProxy(settings(fal.url, options={"mode": "stream"}), environ={})


def test_models_list_describes_the_fal_model(fal: Fal, gateway: str) -> None:
    (model,) = httpx.get(f"{gateway}/v1/models").json()["data"]
    assert model["owned_by"] == "flux-proxy:fal"
    assert "fal.ai" in model["description"] and V11 in model["description"]


# --- the emulator itself -----------------------------------------------------------------------


def emulator_call(fal: Fal, method: str, path: str, **kwargs: Any) -> httpx.Response:
    headers = kwargs.pop("headers", {"Authorization": f"Key {KEY}"})
    return httpx.request(method, f"{fal.url}{path}", headers=headers, timeout=10, **kwargs)


def test_emulator_validation_errors_have_fals_shape(fal: Fal) -> None:
    body = {
        "prompt": "x",
        "num_images": 5,
        "image_size": {"width": 1000, "height": 4000},
        "safety_tolerance": 2,
        "output_format": "webp",
    }
    response = emulator_call(fal, "POST", f"/sync/{V11}", json=body)
    assert response.status_code == 422
    detail = response.json()["detail"]
    by_loc = {tuple(item["loc"]): item for item in detail}
    assert by_loc[("body", "num_images")]["type"] == "less_than_equal"
    assert by_loc[("body", "num_images")]["ctx"] == {"le": 4}
    assert by_loc[("body", "image_size", "width")]["type"] == "multiple_of"
    assert by_loc[("body", "image_size", "height")]["type"] == "less_than_equal"
    assert by_loc[("body", "safety_tolerance")]["type"] == "one_of"  # an int is not "2"
    assert by_loc[("body", "output_format")]["ctx"] == {"expected": ["jpeg", "png"]}
    assert all(item["url"].startswith("https://docs.fal.ai/errors/#") for item in detail)


def test_emulator_auth(fal: Fal) -> None:
    for headers in ({}, {"Authorization": "Key nope"}, {"Authorization": f"Bearer {KEY}"}):
        response = emulator_call(fal, "POST", f"/{V11}", json={"prompt": "x"}, headers=headers)
        assert response.status_code == 401
        assert isinstance(response.json()["detail"], str)


def test_emulator_queue_urls_and_cancel_outcomes(fal: Fal) -> None:
    fal.emulator.polls_before_ready = 0
    ticket = emulator_call(fal, "POST", f"/{V11}", json={"prompt": "x"}).json()
    rid = ticket["request_id"]
    assert ticket["status_url"] == f"{fal.url}/fal-ai/flux-pro/requests/{rid}/status"
    # The sub-path is not part of the request's URLs.
    assert emulator_call(fal, "GET", f"/{V11}/requests/{rid}/status").status_code == 404
    status = emulator_call(fal, "GET", f"/fal-ai/flux-pro/requests/{rid}/status?logs=1")
    assert status.status_code == 200
    assert status.json()["status"] == "COMPLETED"
    assert [line["message"] for line in status.json()["logs"]][-1] == "Done"
    cancel = emulator_call(fal, "PUT", f"/fal-ai/flux-pro/requests/{rid}/cancel")
    assert (cancel.status_code, cancel.json()) == (400, {"status": "ALREADY_COMPLETED"})
    missing = emulator_call(fal, "PUT", "/fal-ai/flux-pro/requests/nope/cancel")
    assert (missing.status_code, missing.json()) == (404, {"status": "NOT_FOUND"})

    fal.emulator.polls_before_ready = 5
    rid = emulator_call(fal, "POST", f"/{V11}", json={"prompt": "x"}).json()["request_id"]
    cancel = emulator_call(fal, "PUT", f"/fal-ai/flux-pro/requests/{rid}/cancel")
    assert (cancel.status_code, cancel.json()) == (202, {"status": "CANCELLATION_REQUESTED"})


def test_emulator_file_urls_are_signed_and_expire(fal: Fal) -> None:
    output = emulator_call(fal, "POST", f"/sync/{V11}", json={"prompt": "x"}).json()
    url = output["images"][0]["url"]
    assert_image(httpx.get(url).content, "jpeg", (1024, 768))  # fal's default: landscape_4_3
    assert output["has_nsfw_concepts"] == [False]
    tampered = url.replace("signature=", "signature=0")
    assert httpx.get(tampered).status_code == 403
    assert httpx.get(url.split("?")[0]).status_code == 403

    fal.emulator.url_ttl = -1  # links made from now on are already expired
    output = emulator_call(fal, "POST", f"/sync/{V11}", json={"prompt": "x"}).json()
    assert httpx.get(output["images"][0]["url"]).status_code == 404
