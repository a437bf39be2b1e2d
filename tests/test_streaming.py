"""stream: true gives OpenAI's server-sent events, readable by the official SDK."""

from __future__ import annotations

import base64

import httpx
import openai
import pytest

from tests.images import assert_image
from tests.openapi import assert_openai_error
from tests.servers import serve
from tests.sse import read_events, stream_events
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
        # 160x120 is not one of the spec's sizes: the event says "auto", the image its size.
        assert event.size == "auto"
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
        events = read_events(response)
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


def test_a_spec_size_is_named_in_the_completed_event(gateway: str) -> None:
    events = stream_events(
        gateway, {"prompt": "x", "size": "1024x1024", "output_format": "jpeg", "stream": True}
    )
    completed = events[0]
    assert (completed["size"], completed["output_format"]) == ("1024x1024", "jpeg")
    assert_image(base64.b64decode(completed["b64_json"]), "jpeg", (1024, 1024))


@pytest.mark.parametrize("fmt", ["avif", "gif"])
def test_a_format_the_stream_events_cannot_name_is_a_plain_400(gateway: str, fmt: str) -> None:
    response = httpx.post(
        f"{gateway}/v1/images/generations",
        json={"prompt": "x", "size": "64x64", "output_format": fmt, "stream": True},
    )
    error = assert_openai_error(response, 400, param="output_format")
    assert fmt in error["message"] and "stream" in error["message"]


def test_streamed_upstream_urls_still_carry_the_bytes(start_gateway):
    """b64_json is required in the completed event, even where JSON answers keep the link."""
    recorder = RecordingUpstream()
    with serve(recorder.app()) as url:
        gateway = start_gateway(
            {
                "store": {"return_upstream_urls": True},
                "models": {
                    "m": {
                        "provider": "openai",
                        "base_url": f"{url}/v1",
                        "options": {"response_format": "url"},
                    }
                },
            }
        )
        events = stream_events(
            gateway, {"model": "m", "prompt": "x", "size": "1024x1024", "stream": True}
        )
    completed = [event for event in events if event["type"] == "image_generation.completed"]
    assert len(completed) == 1
    assert_image(base64.b64decode(completed[0]["b64_json"]), "png", (1024, 1024))
    assert completed[0]["b64_json"] == base64.b64encode(recorder.produced[0]).decode()
