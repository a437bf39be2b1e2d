"""Per-upstream circuit breakers: open after failures in a row, skip, probe with one trial.

Time is a fake clock handed to the gateway: cool-downs pass without sleeping.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from flux_proxy import FluxProxy
from flux_proxy.breaker import BreakerState, CircuitBreaker, UpstreamId
from flux_proxy.config import BreakerSettings
from tests.images import assert_image, make_image
from tests.openapi import assert_openai_error

pytestmark = pytest.mark.anyio


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class Events:
    changes: list[str] = field(default_factory=list)
    skips: int = 0

    def state_changed(self, upstream: UpstreamId, state: BreakerState) -> None:
        self.changes.append(str(state))

    def skipped(self, upstream: UpstreamId) -> None:
        self.skips += 1


UPSTREAM = UpstreamId("openai", "http://upstream.test/v1", "first")


def make_breaker(clock: FakeClock, events: Events, **settings: Any) -> CircuitBreaker:
    options = {"failure_threshold": 3, "window_seconds": 10, "cooldown_seconds": 30, **settings}
    return CircuitBreaker(UPSTREAM, BreakerSettings(**options), clock, events)


def state_of(breaker: CircuitBreaker) -> BreakerState:
    """Read afresh each time (mypy would carry an earlier assert's narrowing over)."""
    return breaker.state


def fail(breaker: CircuitBreaker, times: int = 1) -> None:
    for _ in range(times):
        ticket = breaker.acquire()
        assert ticket is not None
        breaker.failed(ticket, "upstream_error")


def test_failures_in_a_row_open_it_and_it_skips_until_the_cool_down_ends():
    clock, events = FakeClock(), Events()
    breaker = make_breaker(clock, events)
    fail(breaker, 2)
    assert state_of(breaker) is BreakerState.CLOSED
    fail(breaker)
    assert state_of(breaker) is BreakerState.OPEN
    assert events.changes == ["open"]
    clock.advance(29)
    assert breaker.acquire() is None
    assert breaker.retry_in() == pytest.approx(1)
    assert events.skips == 1


def test_a_success_resets_the_count():
    breaker = make_breaker(FakeClock(), Events())
    fail(breaker, 2)
    ticket = breaker.acquire()
    assert ticket is not None
    breaker.succeeded(ticket)
    fail(breaker, 2)
    assert state_of(breaker) is BreakerState.CLOSED


def test_failures_further_apart_than_the_window_do_not_open_it():
    clock = FakeClock()
    breaker = make_breaker(clock, Events())
    for _ in range(6):
        fail(breaker)
        clock.advance(6)  # two failures fit in 10 s, three never do
    assert state_of(breaker) is BreakerState.CLOSED


def test_after_the_cool_down_one_trial_runs_and_its_success_closes_the_circuit():
    clock, events = FakeClock(), Events()
    breaker = make_breaker(clock, events)
    fail(breaker, 3)
    clock.advance(30)
    trial = breaker.acquire()
    assert trial is not None and trial.trial
    assert state_of(breaker) is BreakerState.HALF_OPEN
    assert breaker.acquire() is None  # one trial at a time: the rest still skip
    breaker.succeeded(trial)
    assert state_of(breaker) is BreakerState.CLOSED
    assert events.changes == ["open", "half_open", "closed"]
    ticket = breaker.acquire()
    assert ticket is not None and not ticket.trial


def test_a_failed_trial_opens_it_for_another_cool_down():
    clock = FakeClock()
    breaker = make_breaker(clock, Events())
    fail(breaker, 3)
    clock.advance(31)
    fail(breaker)  # the trial
    assert state_of(breaker) is BreakerState.OPEN
    clock.advance(29)
    assert breaker.acquire() is None
    clock.advance(1)
    assert breaker.acquire() is not None


def test_a_trial_that_tells_nothing_passes_to_the_next_request():
    clock = FakeClock()
    breaker = make_breaker(clock, Events())
    fail(breaker, 3)
    clock.advance(30)
    trial = breaker.acquire()
    assert trial is not None
    breaker.released(trial)  # the client left, say
    assert state_of(breaker) is BreakerState.HALF_OPEN
    again = breaker.acquire()
    assert again is not None and again.trial


def test_a_call_that_began_before_it_opened_changes_nothing():
    clock = FakeClock()
    breaker = make_breaker(clock, Events())
    early = breaker.acquire()
    assert early is not None
    fail(breaker, 3)
    breaker.failed(early, "upstream_timeout")
    clock.advance(30)
    assert breaker.acquire() is not None  # its cool-down was not restarted


def test_disabled_it_never_opens():
    breaker = make_breaker(FakeClock(), Events(), enabled=False)
    fail(breaker, 20)
    assert state_of(breaker) is BreakerState.CLOSED


# --- through the gateway -----------------------------------------------------------------


@dataclass
class Upstream:
    """An OpenAI Images upstream (in process) that fails with ``status`` until healed."""

    status: int = 503
    calls: int = 0

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self._answer)

    def _answer(self, request: httpx.Request) -> httpx.Response:
        self.calls += 1
        if self.status != 200:
            return httpx.Response(self.status, json={"error": {"message": "down"}})
        image = base64.b64encode(make_image("png", (32, 32))).decode()
        return httpx.Response(200, json={"data": [{"b64_json": image}]})


def gateway(upstream: Upstream, clock: FakeClock, *, fallback: bool = True, **model: Any) -> Any:
    providers: list[dict[str, Any]] = [
        {"provider": "openai", "base_url": "http://upstream.test/v1", "upstream_model": "first"}
    ]
    if fallback:
        providers.append({"provider": "local"})
    providers[0].update(model)
    config = {
        "breaker": {"failure_threshold": 2, "cooldown_seconds": 30},
        "models": {"m": {"providers": providers}},
    }
    return FluxProxy(config, environ={}, transport=upstream.transport(), clock=clock)


async def post(app: FluxProxy) -> httpx.Response:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway.test") as client:
        body = {"model": "m", "prompt": "x", "size": "32x32", "response_format": "b64_json"}
        return await client.post("/v1/images/generations", json=body)


def served_by(response: httpx.Response) -> tuple[str, str]:
    assert response.status_code == 200, response.text
    assert_image(base64.b64decode(response.json()["data"][0]["b64_json"]), "png", (32, 32))
    report = json.loads(response.headers["x-flux-proxy-params"])
    return response.headers["x-flux-proxy-provider"], report["model"]["detail"]


async def test_an_open_circuit_sends_failover_straight_on_and_a_trial_closes_it():
    upstream, clock = Upstream(), FakeClock()
    app = gateway(upstream, clock)
    for _ in range(2):
        provider, detail = served_by(await post(app))
        assert provider == "local"
        assert "after openai (upstream_error) failed" in detail
    assert upstream.calls == 2

    provider, detail = served_by(await post(app))
    assert provider == "local"
    assert upstream.calls == 2  # skipped, not called
    assert "openai skipped (circuit open, probed again in 30 s)" in detail
    assert "failed" not in detail

    clock.advance(30)
    upstream.status = 200
    assert served_by(await post(app))[0] == "openai"  # the trial
    assert served_by(await post(app))[0] == "openai"  # closed again
    assert upstream.calls == 4


async def test_with_every_provider_skipped_the_answer_is_a_fast_503_with_retry_after():
    upstream, clock = Upstream(), FakeClock()
    app = gateway(upstream, clock, fallback=False)
    for _ in range(2):
        assert_openai_error(await post(app), 502)
    clock.advance(10)
    error = assert_openai_error(refused := await post(app), 503)
    assert error["code"] == "upstream_unavailable"
    assert "openai (upstream_error)" in error["message"]
    assert refused.headers["retry-after"] == "20"
    assert upstream.calls == 2

    clock.advance(20)
    assert_openai_error(await post(app), 502)  # the trial, failing again
    assert upstream.calls == 3
    assert_openai_error(await post(app), 503)


@pytest.mark.parametrize(("status", "code"), [(400, None), (429, "rate_limit_exceeded")])
async def test_what_an_upstream_answer_counts_for(status, code):
    # A refusal of the input says the upstream is up; a 429 is a failure like a 5xx.
    upstream, clock = Upstream(status=status), FakeClock()
    app = gateway(upstream, clock, fallback=False)
    for _ in range(3):
        response = await post(app)
    if code is None:
        assert_openai_error(response, status)
        assert upstream.calls == 3
    else:
        assert_openai_error(response, 503)
        assert upstream.calls == 2


async def test_a_missing_key_never_opens_the_circuit():
    # Nothing was sent, and the 502 that names the unset variable must stay visible.
    upstream, clock = Upstream(status=200), FakeClock()
    app = gateway(upstream, clock, fallback=False, api_key_env="UNSET_TEST_KEY")
    for _ in range(4):
        error = assert_openai_error(await post(app), 502)
        assert error["code"] == "upstream_credentials_missing"
    assert upstream.calls == 0


async def test_metrics_say_which_circuit_is_open_and_how_often_it_was_skipped():
    upstream, clock = Upstream(), FakeClock()
    app = gateway(upstream, clock)
    for _ in range(3):
        await post(app)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway.test") as client:
        exposition = (await client.get("/metrics")).text
    labels = {
        "gen_ai_provider_name": "openai",
        "upstream_model": "first",
        "server_address": "upstream.test",
    }
    samples = {
        sample.name: sample.value
        for family in text_string_to_metric_families(exposition)
        for sample in family.samples
        if sample.labels == labels
    }
    assert samples["flux_proxy_circuit_state"] == 2  # open
    assert samples["flux_proxy_circuit_skips_total"] == 1  # the third request
