"""n fan-out: concurrent provider calls, ordered results, seed + i, all-or-nothing."""

from __future__ import annotations

import base64
import json
from typing import Any

import httpx
import openai
import pytest

from tests.images import assert_image, data_of, decode
from tests.openapi import assert_openai_error
from tests.servers import serve
from tests.upstream_openai import RecordingUpstream


def test_n_images_differ_and_follow_seed_plus_i(client: openai.OpenAI) -> None:
    def render(seed: int, n: int) -> list[bytes]:
        result = client.images.generate(
            model="flux1.1-pro",
            prompt="a fox",
            size="128x96",
            n=n,
            response_format="b64_json",
            extra_body={"seed": seed},
        )
        images = [base64.b64decode(item.b64_json or "") for item in data_of(result)]
        for data in images:
            assert_image(data, "png", (128, 96))
        return [decode(data).tobytes() for data in images]

    four = render(seed=10, n=4)
    assert len(set(four)) == 4
    # Image i is the image seed + i would give alone: order is kept.
    assert [render(seed=10 + i, n=1)[0] for i in range(4)] == four


def upstream_config(url: str, per_call: int) -> dict[str, Any]:
    return {
        "limits": {"fanout_concurrency": 2},
        "models": {
            "up": {
                "provider": "openai",
                "base_url": f"{url}/v1",
                "options": {"response_format": "b64_json"},
                "capabilities": {"max_images_per_call": per_call, "accepts_seed": True},
            }
        },
    }


def test_split_into_calls_of_what_the_provider_makes(start_gateway):
    recorder = RecordingUpstream()
    with serve(recorder.app()) as url:
        gateway = start_gateway(upstream_config(url, per_call=3))
        response = httpx.post(
            f"{gateway}/v1/images/generations",
            json={"model": "up", "prompt": "x", "n": 7, "seed": 100, "size": "64x64"},
            timeout=30,
        )
    assert response.status_code == 200, response.text
    assert len(response.json()["data"]) == 7
    calls = sorted((body["seed"], body.get("n", 1)) for body in recorder.requests)
    assert calls == [(100, 3), (103, 3), (106, 1)]
    report = json.loads(response.headers["x-flux-proxy-params"])
    assert report["n"] == {"handling": "emulated", "detail": "3 provider calls of up to 3 image(s)"}
    assert report["seed"]["handling"] == "emulated"


def test_n_within_one_call_is_passed_on(start_gateway):
    recorder = RecordingUpstream()
    with serve(recorder.app()) as url:
        gateway = start_gateway(upstream_config(url, per_call=4))
        response = httpx.post(
            f"{gateway}/v1/images/generations",
            json={"model": "up", "prompt": "x", "n": 4, "size": "64x64"},
        )
    assert len(response.json()["data"]) == 4
    assert [body["n"] for body in recorder.requests] == [4]


@pytest.mark.parametrize("status", [500, 503])
def test_one_failed_call_fails_the_request(start_gateway, status):
    recorder = RecordingUpstream(fail_with=(status, {"error": {"message": "boom"}}, {}))
    with serve(recorder.app()) as url:
        gateway = start_gateway(upstream_config(url, per_call=1))
        response = httpx.post(
            f"{gateway}/v1/images/generations",
            json={"model": "up", "prompt": "x", "n": 3, "size": "64x64"},
        )
    error = assert_openai_error(response, 502)
    assert "boom" in error["message"]
    assert "data" not in response.json()


def test_a_failure_among_successes_is_no_half_answer(start_gateway):
    recorder = RecordingUpstream(
        fail_with=(429, {"error": {"message": "slow down"}}, {"Retry-After": "7"}), fail_calls={1}
    )
    with serve(recorder.app()) as url:
        gateway = start_gateway(upstream_config(url, per_call=1))
        response = httpx.post(
            f"{gateway}/v1/images/generations",
            json={"model": "up", "prompt": "x", "n": 3, "size": "64x64"},
        )
    assert_openai_error(response, 429)
    assert response.headers["retry-after"] == "7"
