"""stream: true gives OpenAI's server-sent events, readable by the official SDK."""

from __future__ import annotations

import base64
import json

import httpx
import openai

from tests.images import assert_image
from tests.servers import serve
from tests.upstream_openai import RecordingUpstream


def test_sdk_stream_gets_one_completed_event_per_image(client: openai.OpenAI) -> None:
    events = list(
        client.images.generate(
            model="flux1.1-pro",
            prompt="a fox",
            size="160x120",
            n=2,
            output_format="webp",
            stream=True,
        )
    )
    completed = [event for event in events if event.type == "image_generation.completed"]
    assert len(completed) == 2
    for event in completed:
        assert event.output_format == "webp"
        assert event.size == "160x120"
        assert_image(base64.b64decode(event.b64_json), "webp", (160, 120))
    # The gateway's own event types are outside the SDK's union: compare them as strings.
    report = [event for event in events if str(event.type) == "flux_proxy.report"]
    assert len(report) == 1
    params = (report[0].model_extra or {})["params"]
    assert params["n"]["handling"] == "emulated"
    assert params["output_format"]["handling"] == "passthrough"


def test_stream_report_event_describes_every_parameter(gateway: str) -> None:
    body = {"model": "flux1.1-pro", "prompt": "x", "size": "64x64", "stream": True, "seed": 4}
    with httpx.stream("POST", f"{gateway}/v1/images/generations", json=body) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line.startswith("data: ")]
    events = [json.loads(line[len("data: ") :]) for line in lines]
    assert [event["type"] for event in events] == [
        "image_generation.completed",
        "flux_proxy.report",
    ]
    assert events[1]["provider"] == "local"
    assert set(events[1]["params"]) == {"model", "prompt", "size", "stream", "seed"}
    assert events[1]["params"]["stream"]["handling"] == "emulated"


def test_stream_failure_is_an_error_event_the_sdk_raises(start_gateway):
    recorder = RecordingUpstream(fail_with=(500, {"error": {"message": "boom"}}, {}))
    with serve(recorder.app()) as url:
        gateway = start_gateway({"models": {"m": {"provider": "openai", "base_url": f"{url}/v1"}}})
        client = openai.OpenAI(base_url=f"{gateway}/v1", api_key="x", max_retries=0)
        try:
            list(client.images.generate(model="m", prompt="x", size="64x64", stream=True))
        except openai.APIError as error:
            assert "boom" in error.message
        else:
            raise AssertionError("the stream should have raised")


def test_invalid_streaming_request_is_a_plain_400(gateway: str) -> None:
    response = httpx.post(
        f"{gateway}/v1/images/generations",
        json={"model": "flux1.1-pro", "prompt": "x", "size": "0x0", "stream": True},
    )
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "size"
