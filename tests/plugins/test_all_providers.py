"""The three provider plugins side by side, each against its emulator on loopback:
honest reports per provider, SDK streaming with progress, failover between them."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from typing import Any

import openai
import pytest

from flux_proxy_bfl.emulator import create_app as bfl_emulator
from flux_proxy_fal.emulator import create_app as fal_emulator
from flux_proxy_replicate.emulator import create_app as replicate_emulator
from tests.images import assert_image, data_of
from tests.servers import ServeUpstream

KEY = "emulator-key"
FAST_POLLS = {"poll_interval": 0.05, "poll_max_interval": 0.1}


@pytest.fixture
def emulators(serve_upstream: ServeUpstream) -> dict[str, str]:
    """Fresh emulators for each test, on the session's shared loopback servers."""
    apps = {
        "bfl": bfl_emulator(polls_before_ready=2, retry_after=None),
        "fal": fal_emulator(polls_before_ready=2),
        "replicate": replicate_emulator(polls_until_ready=2, finish_within_wait=False),
    }
    return {name: serve_upstream(app) for name, app in apps.items()}


def provider(name: str, url: str, key_env: str = "EMULATOR_KEY") -> dict[str, Any]:
    options = dict(FAST_POLLS)
    if name == "replicate":
        options["wait_seconds"] = 0
    return {"provider": name, "base_url": url, "api_key_env": key_env, "options": options}


def client_for(
    start_gateway: Callable[..., str], models: dict[str, Any], environ: dict[str, Any] | None = None
) -> openai.OpenAI:
    gateway = start_gateway({"models": models}, environ=environ or {"EMULATOR_KEY": KEY})
    return openai.OpenAI(base_url=f"{gateway}/v1", api_key="x", max_retries=0, timeout=30)


def test_the_same_request_gets_three_honest_reports(start_gateway, emulators):
    models = {name: provider(name, url) for name, url in emulators.items()}
    client = client_for(start_gateway, models)
    reports = {}
    for name in models:
        raw = client.images.with_raw_response.generate(
            model=name,
            prompt="a heron",
            size="1920x1080",
            n=2,
            output_format="jpeg",
            output_compression=60,
            response_format="b64_json",
            extra_body={"seed": 5, "safety_tolerance": 3},
        )
        assert raw.headers["x-flux-proxy-provider"] == name
        for item in data_of(raw.parse()):
            assert_image(base64.b64decode(item.b64_json or ""), "jpeg", (1920, 1080))
        reports[name] = json.loads(raw.headers["x-flux-proxy-params"])

    # The provider's size cap is 1440 everywhere: the gateway resizes to the exact size.
    assert all(report["size"]["handling"] == "emulated" for report in reports.values())
    # n: one task per image at BFL and Replicate; fal makes up to 4 per call.
    assert reports["bfl"]["n"]["handling"] == "emulated"
    assert reports["replicate"]["n"]["handling"] == "emulated"
    assert reports["fal"]["n"]["handling"] == "renamed"
    # safety_tolerance: an integer at BFL and Replicate, a string at fal.
    assert reports["bfl"]["safety_tolerance"]["handling"] == "passthrough"
    assert reports["replicate"]["safety_tolerance"]["handling"] == "passthrough"
    assert reports["fal"]["safety_tolerance"]["handling"] == "converted"
    # Compression: only Replicate has a quality field (output_quality); the others are emulated.
    assert reports["replicate"]["output_compression"]["handling"] == "renamed"
    assert "output_quality" in reports["replicate"]["output_compression"]["detail"]
    assert reports["bfl"]["output_compression"]["handling"] == "emulated"
    assert reports["fal"]["output_compression"]["handling"] == "emulated"
    # jpeg is spelled jpg at Replicate.
    assert reports["replicate"]["output_format"]["handling"] == "converted"
    assert len({json.dumps(report, sort_keys=True) for report in reports.values()}) == 3


@pytest.mark.parametrize("name", ["bfl", "fal", "replicate"])
def test_sdk_stream_shows_polling_progress_then_the_image(start_gateway, emulators, name):
    client = client_for(start_gateway, {"m": provider(name, emulators[name])})
    events = list(
        client.images.generate(
            model="m", prompt="a heron", size="512x512", output_format="png", stream=True
        )
    )
    # The gateway's own event types are outside the SDK's union: compare them as strings.
    kinds = [str(event.type) for event in events]
    assert "flux_proxy.progress" in kinds
    assert kinds.index("flux_proxy.progress") < kinds.index("image_generation.completed")
    progress = next(event for event in events if str(event.type) == "flux_proxy.progress")
    assert (progress.model_extra or {})["provider"] == name
    completed = [event for event in events if event.type == "image_generation.completed"]
    assert len(completed) == 1
    assert_image(base64.b64decode(completed[0].b64_json), "png", (512, 512))
    assert kinds[-1] == "flux_proxy.report"


def test_failover_from_a_rejected_key_to_the_next_provider(start_gateway, emulators):
    models = {
        "flux1.1-pro": {
            "providers": [
                provider("bfl", emulators["bfl"], key_env="WRONG_KEY"),
                provider("fal", emulators["fal"]),
            ]
        }
    }
    client = client_for(
        start_gateway, models, environ={"WRONG_KEY": "not-the-key", "EMULATOR_KEY": KEY}
    )
    raw = client.images.with_raw_response.generate(
        model="flux1.1-pro", prompt="a heron", size="256x256", response_format="b64_json"
    )
    assert raw.headers["x-flux-proxy-provider"] == "fal"
    detail = json.loads(raw.headers["x-flux-proxy-params"])["model"]["detail"]
    assert "served by provider fal" in detail and "bfl (upstream_auth_failed)" in detail
    assert "not-the-key" not in raw.text
    assert_image(base64.b64decode(data_of(raw.parse())[0].b64_json or ""), "png", (256, 256))


@pytest.mark.parametrize("name", ["bfl", "replicate"])
def test_replicate_style_width_and_height_reach_the_provider_natively(
    start_gateway, emulators, name
):
    client = client_for(start_gateway, {"m": provider(name, emulators[name])})
    raw = client.images.with_raw_response.generate(
        model="m",
        prompt="a heron",
        response_format="b64_json",
        output_format="png",
        extra_body={"aspect_ratio": "custom", "width": 800, "height": 600},
    )
    # BFL and Replicate take multiples of 32: 800x608 is made, the gateway crops to 800x600.
    assert_image(base64.b64decode(data_of(raw.parse())[0].b64_json or ""), "png", (800, 600))
    report = json.loads(raw.headers["x-flux-proxy-params"])
    assert report["width"]["handling"] == "converted"
    assert "800x608" in report["aspect_ratio"]["detail"]
