"""Reading the gateway's server-sent events the way a plain HTTP client would."""

from __future__ import annotations

import json
from typing import Any

import httpx


def stream_events(gateway: str, body: dict[str, Any], timeout: float = 30) -> list[dict[str, Any]]:
    """POST ``body`` to the gateway's generations route and return every event's data."""
    events = []
    with httpx.stream(
        "POST", f"{gateway}/v1/images/generations", json=body, timeout=timeout
    ) as response:
        for line in response.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[len("data: ") :]))
    return events
