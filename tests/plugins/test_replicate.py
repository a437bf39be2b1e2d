"""The replicate plugin end to end: gateway (uvicorn) -> Replicate emulator (uvicorn), both on
loopback, driven with the official openai SDK; plus the emulator's own protocol checks."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import openai
import pytest
from starlette.testclient import TestClient

from flux_proxy import FluxProxy
from flux_proxy.config import ConfigError
from flux_proxy_replicate.emulator import ReplicateEmulator, create_app
from tests.images import assert_image, data_of, decode, inline_jpeg_base64
from tests.openapi import assert_openai_error
from tests.servers import ServeUpstream, serve
from tests.sse import stream_events
from tests.waiting import wait_for

KEY = "r8_emulated-secret-0123456789abcdef"
PRO = "black-forest-labs/flux-1.1-pro"
ULTRA = "black-forest-labs/flux-1.1-pro-ultra"
CREATE_PATH = f"/v1/models/{PRO}/predictions"

Start = Callable[..., tuple[ReplicateEmulator, str]]


def config(url: str, *, limits: dict[str, Any] | None = None, **entry: Any) -> dict[str, Any]:
    options = {"poll_interval": 0.02, **entry.pop("options", {})}
    model = {
        "provider": "replicate",
        "upstream_model": PRO,
        "base_url": url,
        "api_key_env": "REPLICATE_API_TOKEN",
        "options": options,
        **entry,
    }
    settings: dict[str, Any] = {"models": {"flux1.1-pro": model}}
    if limits:
        settings["limits"] = limits
    return settings


@pytest.fixture
def start(start_gateway: Callable[..., str], serve_upstream: ServeUpstream) -> Start:
    """Serve a fresh emulator with ``knobs`` and a gateway in front of it."""

    def run(
        knobs: dict[str, Any] | None = None,
        *,
        environ: dict[str, str] | None = None,
        **entry: Any,
    ) -> tuple[ReplicateEmulator, str]:
        app = create_app(**{"api_key": KEY, **(knobs or {})})
        url = serve_upstream(app)
        environ = {"REPLICATE_API_TOKEN": KEY} if environ is None else environ
        return app.state.emulator, start_gateway(config(url, **entry), environ=environ)

    return run


def sdk(gateway: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway}/v1", api_key="x", max_retries=0)


def post(gateway: str, timeout: float = 30, **body: Any) -> httpx.Response:
    return httpx.post(
        f"{gateway}/v1/images/generations",
        json={"model": "flux1.1-pro", "prompt": "a kestrel", "size": "256x256", **body},
        timeout=timeout,
    )


def creates(emulator: ReplicateEmulator) -> list[Any]:
    return [r for r in emulator.records if r.method == "POST" and r.path.endswith("/predictions")]


def polls(emulator: ReplicateEmulator) -> list[Any]:
    return [r for r in emulator.records if r.method == "GET" and "/v1/predictions/" in r.path]


# --- the happy paths ---------------------------------------------------------------------------


def test_one_prediction_with_every_field_inside_input(start: Start) -> None:
    emulator, gateway = start()
    extras = {
        "safety_tolerance": "3",  # a string: Replicate wants an integer
        "prompt_upsampling": True,
        "image_prompt": "https://example.com/redux.png",
    }
    raw = sdk(gateway).images.with_raw_response.generate(
        model="flux1.1-pro",
        prompt="a kestrel",
        size="256x256",
        output_format="webp",
        output_compression=70,
        response_format="b64_json",
        extra_body={"seed": 42, **extras},
    )
    image = data_of(raw.parse())[0].b64_json or ""
    assert_image(base64.b64decode(image), "webp", (256, 256))

    [create] = creates(emulator)
    assert create.path == CREATE_PATH
    assert create.headers["authorization"] == f"Bearer {KEY}"
    assert create.headers["prefer"] == "wait"
    assert create.body == {
        "input": {
            "prompt": "a kestrel",
            "aspect_ratio": "custom",
            "width": 256,
            "height": 256,
            "seed": 42,
            "output_format": "webp",
            "output_quality": 70,
            "safety_tolerance": 3,
            "prompt_upsampling": True,
            "image_prompt": "https://example.com/redux.png",
        }
    }
    assert polls(emulator) == []  # Prefer: wait answered with the finished prediction

    assert raw.headers["x-flux-proxy-provider"] == "replicate"
    report = json.loads(raw.headers["x-flux-proxy-params"])
    assert report["size"] == {
        "handling": "converted",
        "detail": "sent as aspect_ratio=custom, width=256, height=256",
    }
    assert report["output_format"]["handling"] == "passthrough"
    assert report["output_compression"] == {
        "handling": "renamed",
        "detail": "sent as output_quality",
    }
    assert report["safety_tolerance"]["handling"] == "converted"
    assert report["prompt_upsampling"]["handling"] == "passthrough"
    assert report["image_prompt"]["handling"] == "passthrough"
    assert report["seed"]["handling"] == "passthrough"
    assert report["prompt"]["handling"] == "passthrough"


def test_an_inline_output_is_passed_on_as_replicate_wrote_it(start: Start) -> None:
    written: list[str] = []

    def inline(data: bytes) -> str:
        written.append(inline_jpeg_base64(data))  # valid, but no encoder writes it
        return written[-1]

    _, gateway = start({"inline_outputs": inline})
    response = post(gateway, output_format="jpeg", response_format="b64_json")
    assert response.status_code == 200, response.text
    [text] = [item["b64_json"] for item in response.json()["data"]]
    assert [text] == written  # not decoded and encoded again
    assert_image(base64.b64decode(text), "jpeg", (256, 256))
    hosted = post(gateway, output_format="jpeg", response_format="url")
    assert hosted.status_code == 200, hosted.text  # decoded for the store this time
    assert_image(httpx.get(hosted.json()["data"][0]["url"]).content, "jpeg", (256, 256))


def test_a_truncated_inline_output_is_a_502_that_says_so(start: Start) -> None:
    _, gateway = start({"inline_outputs": lambda data: base64.b64encode(data[:-40]).decode()})
    for response_format in ("b64_json", "url"):
        response = post(gateway, output_format="jpeg", response_format=response_format)
        error = assert_openai_error(response, 502)
        assert "truncated jpeg image" in error["message"], error


def test_polling_follows_urls_get_and_jpeg_is_spelled_jpg(start: Start) -> None:
    # wait_seconds 0: no Prefer header, so the prediction comes back "starting"; the
    # emulator names its poll URL under /alt, which only a client that follows urls.get finds.
    emulator, gateway = start(
        {"polls_until_ready": 3, "urls_prefix": "/alt"}, options={"wait_seconds": 0}
    )
    raw = sdk(gateway).images.with_raw_response.generate(
        model="flux1.1-pro",
        prompt="a kestrel",
        size="1920x1080",
        output_format="jpeg",
        extra_body={"width": 999},
    )
    url = data_of(raw.parse())[0].url or ""
    assert_image(httpx.get(url).content, "jpeg", (1920, 1080))

    [create] = creates(emulator)
    assert "prefer" not in create.headers
    sent = create.body["input"]
    # 1920x1080 is past Replicate's 1440 cap: the nearest it makes, in multiples of 32.
    assert (sent["aspect_ratio"], sent["width"], sent["height"]) == ("custom", 1440, 800)
    assert sent["output_format"] == "jpg"
    assert "output_quality" not in sent  # no output_compression asked
    prediction_id = next(iter(emulator.predictions))
    assert [p.path for p in polls(emulator)] == [f"/alt/v1/predictions/{prediction_id}"] * 3
    assert all(p.headers["authorization"] == f"Bearer {KEY}" for p in polls(emulator))

    report = json.loads(raw.headers["x-flux-proxy-params"])
    assert report["size"]["handling"] == "emulated"
    assert report["size"]["detail"].startswith(
        "sent as aspect_ratio=custom, width=1440, height=800;"
    )
    assert "gateway resizes to 1920x1080" in report["size"]["detail"]
    assert report["output_format"] == {
        "handling": "converted",
        "detail": "sent as output_format='jpg'",
    }
    assert report["width"]["handling"] == "ignored"  # the gateway's width (from size) wins


def test_n_fans_out_to_one_prediction_per_image_with_seed_plus_i(start: Start) -> None:
    emulator, gateway = start(options={"wait_seconds": 10})
    raw = sdk(gateway).images.with_raw_response.generate(
        model="flux1.1-pro",
        prompt="a kestrel",
        size="256x256",
        n=2,
        output_format="png",
        response_format="b64_json",
        extra_body={"seed": 7},
    )
    for item in data_of(raw.parse()):
        assert_image(base64.b64decode(item.b64_json or ""), "png", (256, 256))
    report = json.loads(raw.headers["x-flux-proxy-params"])
    assert report["n"]["handling"] == "emulated"
    assert report["seed"]["handling"] == "emulated"
    # Both calls share the report; the native form is said once.
    assert report["size"]["detail"] == "sent as aspect_ratio=custom, width=256, height=256"
    sent = sorted(creates(emulator), key=lambda r: r.body["input"]["seed"])
    assert [r.body["input"]["seed"] for r in sent] == [7, 8]
    assert all(r.headers["prefer"] == "wait=10" for r in sent)
    assert all(r.body["input"]["output_format"] == "png" for r in sent)
    assert all("output_quality" not in r.body["input"] for r in sent)


def test_ultra_gets_an_aspect_ratio_preset(start: Start) -> None:
    emulator, gateway = start(upstream_model=ULTRA)
    raw = sdk(gateway).images.with_raw_response.generate(
        model="flux1.1-pro",
        prompt="a kestrel",
        output_format="png",
        response_format="b64_json",
        extra_body={"aspect_ratio": "16:9", "raw": "true"},
    )
    assert_image(base64.b64decode(data_of(raw.parse())[0].b64_json or ""), "png", (1376, 768))
    [create] = creates(emulator)
    assert create.path == f"/v1/models/{ULTRA}/predictions"
    assert create.body["input"] == {
        "prompt": "a kestrel",
        "aspect_ratio": "16:9",
        "output_format": "png",
        "raw": True,
    }
    made = next(iter(emulator.predictions.values())).size
    assert made == (2752, 1536)
    report = json.loads(raw.headers["x-flux-proxy-params"])
    assert report["aspect_ratio"]["handling"] == "emulated"  # made at 4 MP, resized down
    assert report["aspect_ratio"]["detail"].startswith("sent as aspect_ratio=16:9;")
    assert report["raw"]["handling"] == "converted"


def test_progress_is_streamed_while_polling(start: Start) -> None:
    _, gateway = start({"polls_until_ready": 3}, options={"wait_seconds": 0})
    events = stream_events(
        gateway,
        {"model": "flux1.1-pro", "prompt": "a kestrel", "size": "256x256", "stream": True},
        timeout=30,
    )
    progress = [e for e in events if e["type"] == "flux_proxy.progress"]
    assert [e["provider"] for e in progress] == ["replicate"] * 3
    assert [e["status"] for e in progress] == ["starting", "processing", "processing"]
    assert [e["progress"] for e in progress] == [None, 0.33, 0.66]
    completed = [e for e in events if e["type"] == "image_generation.completed"]
    assert_image(base64.b64decode(completed[0]["b64_json"]), "png", (256, 256))


# --- failures ----------------------------------------------------------------------------------


@pytest.mark.parametrize("wait_seconds", [None, 0], ids=["answered-in-create", "seen-on-poll"])
def test_e005_is_a_content_policy_violation(start: Start, wait_seconds: int | None) -> None:
    options = {} if wait_seconds is None else {"wait_seconds": wait_seconds}
    emulator, gateway = start(options=options)
    error = assert_openai_error(post(gateway, prompt="please moderate this"), 400)
    assert error["code"] == "content_policy_violation"
    assert "E005" in error["message"]
    assert len(polls(emulator)) == (0 if wait_seconds is None else 1)


def test_a_failed_prediction_is_502(start: Start) -> None:
    _, gateway = start()
    error = assert_openai_error(post(gateway, prompt="crash now"), 502)
    assert error["code"] == "upstream_error"
    assert "crashed" in error["message"]


@pytest.mark.parametrize(
    ("knobs", "status", "code"),
    [
        ({"api_key": "another-key"}, 502, "upstream_auth_failed"),
        ({"insufficient_credit": True}, 502, "upstream_insufficient_credit"),
        ({"throttle_creates": 1, "retry_after": "30"}, 429, "rate_limit_exceeded"),
    ],
    ids=["401", "402", "429"],
)
def test_http_errors_are_mapped_and_never_leak_the_key(
    start: Start, knobs: dict[str, Any], status: int, code: str
) -> None:
    emulator, gateway = start(knobs)
    response = post(gateway)
    error = assert_openai_error(response, status)
    assert error["code"] == code
    assert KEY not in response.text
    assert emulator.predictions == {}
    if status == 429:
        assert response.headers["retry-after"] == "30"
        assert "throttled" in error["message"]


@pytest.mark.parametrize(
    ("entry", "body", "native", "param"),
    [
        # Capabilities widened past Replicate's real limits, so its own 422 answers.
        ({"capabilities": {"sizes": {"max_side": 2048}}}, {"size": "2048x256"}, "width", "size"),
        (
            {"capabilities": {"sizes": {"max_side": 2048}}},
            {"size": None, "aspect_ratio": "1:8", "resolution": "4"},
            "height",
            "aspect_ratio",
        ),
        (
            {"capabilities": {"output_formats": ["webp", "jpeg", "png", "gif"]}},
            {"output_format": "gif"},
            "output_format",
            "output_format",
        ),
        (
            {"capabilities": {"fields": {"safety_tolerance": {"type": "integer"}}}},
            {"safety_tolerance": 9},
            "safety_tolerance",
            "safety_tolerance",
        ),
    ],
    ids=["width", "height-from-aspect-ratio", "output_format", "safety_tolerance"],
)
def test_replicate_422_names_the_public_parameter(
    start: Start, entry: dict[str, Any], body: dict[str, Any], native: str, param: str
) -> None:
    emulator, gateway = start(**entry)
    response = post(gateway, **body)
    error = assert_openai_error(response, 400, param=param)
    assert f"input.{native}" in error["message"]
    assert KEY not in response.text
    assert len(creates(emulator)) == 1 and emulator.predictions == {}


def test_out_of_range_fields_are_refused_before_any_call(start: Start) -> None:
    emulator, gateway = start()
    assert_openai_error(post(gateway, safety_tolerance=0), 400, param="safety_tolerance")
    assert_openai_error(post(gateway, prompt_upsampling="maybe"), 400, param="prompt_upsampling")
    assert emulator.records == []


def test_missing_key_names_the_default_variable(start_gateway: Any) -> None:
    app = create_app(api_key=KEY)
    with serve(app) as url:
        settings = config(url)
        del settings["models"]["flux1.1-pro"]["api_key_env"]  # default: REPLICATE_API_TOKEN
        gateway = start_gateway(settings, environ={})
        error = assert_openai_error(post(gateway), 502)
    assert error["code"] == "upstream_credentials_missing"
    assert "REPLICATE_API_TOKEN" in error["message"]
    assert app.state.emulator.records == []


# --- polling and cancelling ----------------------------------------------------------------------


def test_a_throttled_poll_waits_what_retry_after_says(start: Start) -> None:
    emulator, gateway = start(
        {"throttle_polls": 1, "retry_after": "1"}, options={"wait_seconds": 0}
    )
    assert post(gateway, response_format="b64_json").status_code == 200
    first, second = polls(emulator)
    # Without the hint the next poll would follow 0.02-0.03 s later (poll_interval).
    assert second.at - first.at >= 0.9


@pytest.mark.parametrize("how", ["request_timeout", "client_disconnect", "poll_timeout"])
def test_an_abandoned_request_cancels_the_prediction(start: Start, how: str) -> None:
    options: dict[str, Any] = {"wait_seconds": 0}
    limits = {"request_timeout": 0.5} if how == "request_timeout" else None
    if how == "poll_timeout":
        options["poll_timeout"] = 0.3
    emulator, gateway = start(
        {"polls_until_ready": 10**6, "urls_prefix": "/alt"}, options=options, limits=limits
    )
    if how == "client_disconnect":
        with pytest.raises(httpx.ReadTimeout):
            post(gateway, timeout=0.5)
    else:
        error = assert_openai_error(post(gateway), 504)
        assert error["code"] == "upstream_timeout"

    def cancelled() -> bool:
        return any(r.path.endswith("/cancel") for r in emulator.records)

    assert wait_for(cancelled)
    [prediction] = emulator.predictions.values()
    cancel = next(r for r in emulator.records if r.path.endswith("/cancel"))
    assert cancel.method == "POST"
    assert cancel.path == f"/alt/v1/predictions/{prediction.id}/cancel"  # urls.cancel as given
    assert cancel.headers["authorization"] == f"Bearer {KEY}"
    assert prediction.status == "canceled"


# --- configuration -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"options": {"wait_seconds": 61}}, "options.wait_seconds"),
        ({"options": {"pol_interval": 1}}, "options.pol_interval"),
        ({"upstream_model": "someone/some-model"}, "someone/some-model"),
    ],
)
def test_bad_model_entries_fail_at_startup(entry: dict[str, Any], message: str) -> None:
    settings = config("http://127.0.0.1:9", **entry)
    with pytest.raises(ConfigError, match=message):
        FluxProxy(settings, environ={})


def test_models_endpoint_describes_the_replicate_model(start: Start) -> None:
    _, gateway = start()
    model = sdk(gateway).models.retrieve("flux1.1-pro")
    assert model.owned_by == "flux-proxy:replicate"
    assert PRO in (model.model_extra or {})["description"]


# --- the emulator on its own -------------------------------------------------------------------


@pytest.fixture
def emulated() -> Iterator[tuple[TestClient, ReplicateEmulator]]:
    app = create_app()
    with TestClient(app, base_url="http://replicate.test") as client:
        client.headers["Authorization"] = "Bearer emulator-key"
        yield client, app.state.emulator


def test_emulator_refuses_a_missing_or_wrong_token(
    emulated: tuple[TestClient, ReplicateEmulator],
) -> None:
    client, _ = emulated
    for headers in ({"Authorization": ""}, {"Authorization": "Bearer nope"}):
        response = client.post(CREATE_PATH, json={"input": {"prompt": "x"}}, headers=headers)
        assert response.status_code == 401
        assert response.json() == {
            "title": "Unauthenticated",
            "detail": "You did not pass a valid authentication token",
            "status": 401,
        }
    legacy = client.post(
        CREATE_PATH,
        json={"input": {"prompt": "x"}},
        headers={"Authorization": "Token emulator-key"},
    )
    assert legacy.status_code == 201


def test_emulator_validates_input_in_replicates_shape(
    emulated: tuple[TestClient, ReplicateEmulator],
) -> None:
    client, emulator = emulated
    bad = {
        "aspect_ratio": "7:3",
        "width": 2000,
        "height": "tall",
        "safety_tolerance": 0,
        "output_format": "jpeg",
        "output_quality": 101,
        "image_prompt": "not a uri",
    }
    response = client.post(CREATE_PATH, json={"input": bad})
    assert response.status_code == 422
    body = response.json()
    assert body["title"] == "Input validation failed" and body["status"] == 422
    fields = {item["field"]: item["type"] for item in body["invalid_fields"]}
    assert fields == {
        "input": "required",  # prompt
        "input.aspect_ratio": "enum",
        "input.width": "number_lte",
        "input.height": "invalid_type",
        "input.safety_tolerance": "number_gte",
        "input.output_format": "enum",
        "input.output_quality": "number_lte",
        "input.image_prompt": "format",
    }
    assert "- input.output_format: output_format must be one of the following:" in body["detail"]
    assert emulator.predictions == {}


def test_emulator_rounds_custom_sizes_like_the_older_version_allows(
    emulated: tuple[TestClient, ReplicateEmulator],
) -> None:
    client, _ = emulated
    created = client.post(
        CREATE_PATH,
        json={"input": {"prompt": "x", "aspect_ratio": "custom", "width": 1000, "height": 272}},
        headers={"Prefer": "wait"},
    ).json()
    assert created["status"] == "succeeded" and created["version"] == "hidden"
    image = decode(client.get(created["output"]).content)
    assert (image.format, image.size) == ("WEBP", (992, 288))


def test_emulator_output_links_are_signed_and_expire(
    emulated: tuple[TestClient, ReplicateEmulator],
) -> None:
    client, emulator = emulated
    created = client.post(CREATE_PATH, json={"input": {"prompt": "x", "output_format": "png"}})
    assert created.status_code == 201 and created.json()["status"] == "starting"
    done = client.get(created.json()["urls"]["get"]).json()
    assert done["status"] == "succeeded"
    link = done["output"]
    assert link.startswith("http://replicate.test/delivery/") and "signature=" in link
    assert client.get(link, headers={"Authorization": ""}).status_code == 200  # a CDN: no auth

    assert client.get(link.replace("signature=", "signature=0")).status_code == 403
    now = time.time()
    emulator.clock = lambda: now + 3601
    assert client.get(link).status_code == 404
    removed = client.get(done["urls"]["get"]).json()
    assert removed["output"] is None and removed["data_removed"] is True


def test_emulator_cancels_running_predictions(
    emulated: tuple[TestClient, ReplicateEmulator],
) -> None:
    client, emulator = emulated
    emulator.polls_until_ready = 5
    created = client.post(CREATE_PATH, json={"input": {"prompt": "x"}}).json()
    assert client.get(created["urls"]["get"]).json()["status"] == "processing"
    cancelled = client.post(created["urls"]["cancel"])
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "canceled"
    assert client.get(created["urls"]["get"]).json()["status"] == "canceled"
    unknown = client.post("/v1/predictions/nope/cancel")
    assert unknown.status_code == 404
