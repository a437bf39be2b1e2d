"""The client's JSON as the gateway reads it, and as an ImageRequest: null means the
default, and is remembered."""

from __future__ import annotations

import json

import pytest

from flux_proxy.app import _parse_json
from flux_proxy.schema import ImageRequest


def test_a_request_without_nulls_says_none_were_sent() -> None:
    request = ImageRequest.model_validate({"prompt": "x", "n": 2, "style": "vivid"})
    assert request.null_fields == frozenset()
    assert (request.n, request.extras) == (2, {"style": "vivid"})


def test_nulls_are_the_defaults_and_are_remembered() -> None:
    payload = {"prompt": "x", "n": None, "size": None, "style": None, "_fields_set": "hd"}
    request = ImageRequest.model_validate(payload)
    assert isinstance(request, ImageRequest)
    assert request.null_fields == {"n", "size", "style"}
    assert (request.n, request.size) == (1, None)
    # Unknown fields keep their nulls and order; n's null was dropped, size's was sent.
    assert request.extras == {"style": None, "_fields_set": "hd"}
    assert list(request.extras) == ["style", "_fields_set"]
    assert request.model_fields_set == {"prompt", "size", "style", "_fields_set"}
    assert request.model_dump(exclude_unset=True) == {
        "prompt": "x",
        "size": None,
        "style": None,
        "_fields_set": "hd",
    }


@pytest.mark.parametrize(
    "body",
    [
        b'{"seed": 123456789012345678901234567890, "prompt": "x"}',
        b'{"prompt": "x", "opts": {"seed": -123456789012345678901234567890}}',
        b"[123456789012345678901234567890]",
        b'{"prompt": "x", "ratio": 1.5, "seed": 12345678901234567890123}',
    ],
)
def test_integers_past_64_bits_are_read_exactly(body: bytes) -> None:
    assert _parse_json(body) == json.loads(body)
    assert repr(_parse_json(body)) == repr(json.loads(body))  # ints, not floats
