"""x-request-id: the client's when it is plain and short, else a fresh one; on every answer."""

from __future__ import annotations

import logging

import httpx
import pytest

from tests.sse import read_events

GENERATE = {"model": "flux1.1-pro", "prompt": "x", "size": "32x32"}


def test_a_valid_client_id_is_echoed_on_answers_errors_and_streams(gateway, caplog):
    given = "req-2026.12:01_a+b=c"
    headers = {"x-request-id": given}
    with httpx.Client(base_url=gateway, headers=headers) as http:
        answers = {
            "ok": http.get("/v1/models"),
            "unknown route": http.get("/v1/nothing-here"),
            "bad input": http.post("/v1/images/generations", json={"model": "flux1.1-pro"}),
            "wrong method": http.delete("/v1/models"),
            "probe": http.get("/healthz"),
        }
        with (
            caplog.at_level(logging.INFO, logger="flux_proxy"),
            http.stream("POST", "/v1/images/generations", json={**GENERATE, "stream": True}) as s,
        ):
            events = list(read_events(s))
            answers["stream"] = s
    assert [answer.status_code for answer in answers.values()] == [200, 404, 400, 405, 200, 200]
    for what, answer in answers.items():
        assert answer.headers.get_list("x-request-id") == [given], what
    assert events[-1]["type"] == "flux_proxy.report"
    streamed = [r for r in caplog.records if "/v1/images/generations" in r.getMessage()]
    assert [r.getMessage().endswith(f"(request {given})") for r in streamed] == [True]


@pytest.mark.parametrize(
    "given",
    ["has space", "x" * 129, 'quote"d', "semi;colon", "caf\u00e9", ""],
)
def test_an_unusable_client_id_is_replaced_by_a_fresh_one(gateway, given):
    headers = [(b"x-request-id", given.encode("utf-8"))]
    first = httpx.get(f"{gateway}/v1/models", headers=headers)
    second = httpx.get(f"{gateway}/v1/models", headers=headers)
    ids = [answer.headers["x-request-id"] for answer in (first, second)]
    for request_id in ids:
        assert request_id != given
        assert len(request_id) == 32 and int(request_id, 16) >= 0  # uuid4's hex
    assert ids[0] != ids[1]


def test_without_a_client_id_each_answer_gets_its_own(gateway):
    ids = {httpx.get(f"{gateway}/v1/models").headers["x-request-id"] for _ in range(3)}
    assert len(ids) == 3
