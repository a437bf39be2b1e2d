"""Reading the gateway's server-sent events the way a plain HTTP client would.

Every event is checked as it is read: OpenAI's own event types against the spec's
schemas, errors against ``ErrorResponse``, and the gateway's extensions
(``flux_proxy.*``) for the fields they document.
"""

from __future__ import annotations

import json
from typing import Any

import httpx

from tests.openapi import assert_matches

EXTENSION_FIELDS = {
    "flux_proxy.progress": {"provider", "status", "queue_position", "progress"},
    "flux_proxy.report": {"provider", "params"},
}


def assert_valid_event(name: str, data: dict[str, Any]) -> None:
    """``data`` is a valid event of the SSE ``event:`` type ``name``."""
    if name == "error":
        assert_matches(data, "ErrorResponse")
        return
    assert data.get("type") == name, (name, data)
    if name.startswith("image_generation."):
        assert_matches(data, "ImageGenStreamEvent")
        schema = (
            "ImageGenCompletedEvent" if name.endswith(".completed") else "ImageGenPartialImageEvent"
        )
        assert_matches(data, schema)
        return
    assert name in EXTENSION_FIELDS, f"undocumented event type {name!r}"
    assert EXTENSION_FIELDS[name] <= set(data), (name, data)


def read_events(response: httpx.Response) -> list[dict[str, Any]]:
    """Every event's data from a streaming response, each validated."""
    events: list[dict[str, Any]] = []
    name = "message"
    for line in response.iter_lines():
        if line.startswith("event: "):
            name = line[len("event: ") :]
        elif line.startswith("data: "):
            data = json.loads(line[len("data: ") :])
            assert_valid_event(name, data)
            events.append(data)
            name = "message"
    return events


def stream_events(gateway: str, body: dict[str, Any], timeout: float = 30) -> list[dict[str, Any]]:
    """POST ``body`` to the gateway's generations route and return every event's data."""
    with httpx.stream(
        "POST", f"{gateway}/v1/images/generations", json=body, timeout=timeout
    ) as response:
        assert response.status_code == 200, response.read()
        return read_events(response)
