"""/metrics over a real server, read with Prometheus' own parser: values, not just names."""

from __future__ import annotations

import asyncio
import base64
import re
import secrets
from typing import Any

import httpx
import pytest
from prometheus_client import (
    Counter,
    disable_created_metrics,
    enable_created_metrics,
    generate_latest,
)
from prometheus_client.openmetrics import exposition as openmetrics
from prometheus_client.parser import text_string_to_metric_families

from flux_proxy.breaker import UpstreamId
from flux_proxy.imaging import ImageWorker
from flux_proxy.metrics import MULTIPROCESS_DIR_ENV, BreakerMetrics, Children, Metrics
from flux_proxy.request_context import RequestContext
from tests.images import assert_image
from tests.metrics import scrape
from tests.upstream_openai import RecordingUpstream, gateway_config

GENERATIONS = "/v1/images/generations"
OPERATION = {"gen_ai_operation_name": "image_generation"}


def test_requests_upstream_calls_and_images_are_counted_by_their_labels(
    start_gateway, serve_upstream
):
    url = serve_upstream(RecordingUpstream().app())
    gateway = start_gateway(gateway_config(url, answers="b64_json"))
    unknown_model = f"client-text-{secrets.token_hex(4)}"
    image_bytes = 0
    with httpx.Client(base_url=gateway) as http:
        for _ in range(3):
            body = {"model": "up", "prompt": "x", "size": "64x48", "response_format": "b64_json"}
            answer = http.post(GENERATIONS, json=body)
            assert answer.status_code == 200, answer.text
            image = base64.b64decode(answer.json()["data"][0]["b64_json"])
            assert_image(image, "png", (64, 48))
            image_bytes += len(image)
        missing = http.post(GENERATIONS, json={"model": unknown_model, "prompt": "x"})
        invalid = http.post(GENERATIONS, json={"model": "up"})  # no prompt
        for _ in range(2):
            assert http.get("/v1/models").status_code == 200
    assert (missing.status_code, invalid.status_code) == (404, 400)

    metrics = scrape(gateway)
    requests = "flux_proxy_requests_total"
    route = {"http_route": GENERATIONS, **OPERATION}
    served = {**route, "gen_ai_request_model": "up", "gen_ai_provider_name": "openai"}
    assert metrics.value(requests, **served, http_response_status_code="200") == 3
    assert metrics.value(requests, **route, gen_ai_request_model="unknown") == 1
    assert metrics.value(requests, **route, http_response_status_code="400") == 1
    assert metrics.value(requests, http_route="/v1/models", http_response_status_code="200") == 2
    assert metrics.value(requests, http_route=GENERATIONS) == 5
    assert unknown_model not in metrics.text  # the client's text never becomes a label
    assert metrics.label_values(requests, "gen_ai_request_model") == {"", "up", "unknown"}

    upstream = {"gen_ai_provider_name": "openai"}
    assert metrics.value("flux_proxy_upstream_requests_total", **upstream) == 3
    assert metrics.value("flux_proxy_upstream_duration_seconds_count", **upstream) == 3
    images = {"gen_ai_request_model": "up", "response_format": "b64_json"}
    assert metrics.value("flux_proxy_images_total", **images) == 3
    assert metrics.value("flux_proxy_image_bytes_total", **images) == image_bytes

    gen = {"http_route": GENERATIONS}
    assert metrics.value("flux_proxy_request_duration_seconds_count", **gen) == 5
    assert metrics.value("flux_proxy_overhead_seconds_count", **gen) == 5
    overhead = metrics.value("flux_proxy_overhead_seconds_sum", **gen)
    total = metrics.value("flux_proxy_request_duration_seconds_sum", **gen)
    assert 0 < overhead < total  # the upstream's share is taken out
    # The scrape itself is the one request in flight.
    assert metrics.value("flux_proxy_requests_in_flight", http_route="/metrics") == 1
    assert metrics.value("flux_proxy_requests_in_flight", **gen) == 0


def test_fan_out_width_is_the_calls_a_request_became(start_gateway, serve_upstream):
    recorder = RecordingUpstream()
    gateway = start_gateway(gateway_config(serve_upstream(recorder.app()), answers="b64_json"))
    with httpx.Client(base_url=gateway) as http:
        for n in (3, 1):
            body = {"model": "up", "prompt": "x", "size": "32x32", "n": n}
            assert http.post(GENERATIONS, json=body).status_code == 200
    metrics = scrape(gateway)
    assert len(recorder.requests) == 4  # the provider makes one image a call
    assert metrics.value("flux_proxy_fanout_width_count") == 2
    assert metrics.value("flux_proxy_fanout_width_sum") == 4
    assert metrics.value("flux_proxy_fanout_width_bucket", le="1.0") == 1
    assert metrics.value("flux_proxy_upstream_requests_total", http_response_status_code="200") == 4


def test_transcode_and_resize_seconds_by_format_and_the_store_size(
    start_gateway, serve_upstream, tmp_path
):
    # An upstream that makes PNGs of its own size: the gateway resizes, then transcodes.
    upstream = serve_upstream(RecordingUpstream(force_size=(64, 64)).app())
    store: dict[str, Any] = {"backend": "directory", "directory": str(tmp_path)}
    gateway = start_gateway(gateway_config(upstream, answers="b64_json", **store))
    body = {
        "model": "up",
        "prompt": "x",
        "size": "100x60",
        "output_format": "webp",
        "response_format": "url",
        "n": 2,
    }
    answer = httpx.post(f"{gateway}{GENERATIONS}", json=body)
    assert answer.status_code == 200, answer.text
    hosted = [httpx.get(item["url"]).content for item in answer.json()["data"]]
    for image in hosted:
        assert_image(image, "webp", (100, 60))
    metrics = scrape(gateway)
    seconds = "flux_proxy_image_processing_seconds_count"
    assert metrics.value(seconds, operation="resize", image_format="png") == 2
    assert metrics.value(seconds, operation="transcode", image_format="webp") == 2
    assert metrics.value("flux_proxy_image_processing_seconds_sum", operation="transcode") > 0
    assert metrics.value("flux_proxy_store_images") == 2
    assert metrics.value("flux_proxy_store_bytes") == sum(map(len, hosted))
    files = {"http_route": "/v1/images/files/{name}", "http_response_status_code": "200"}
    assert metrics.value("flux_proxy_requests_total", **files) == 2


def test_metrics_need_no_client_key_and_follow_health_paths(start_gateway):
    gateway = start_gateway(environ={"FLUX_PROXY_API_KEYS": "sk-client"})
    assert httpx.get(f"{gateway}/v1/models").status_code == 401
    metrics = scrape(gateway)  # no key sent
    unauthorised = {"http_route": "/v1/models", "http_response_status_code": "401"}
    assert metrics.value("flux_proxy_requests_total", **unauthorised) == 1
    off = start_gateway({"server": {"health_paths": False}})
    assert httpx.get(f"{off}/metrics").status_code == 404


def test_overlapping_upstream_exchanges_count_once_toward_the_wait(monkeypatch):
    # A clock the test moves: two exchanges overlap (fan-out), a third comes later.
    now = [0.0]
    monkeypatch.setattr("flux_proxy.request_context.time.perf_counter", lambda: now[0])
    context = RequestContext("r")

    start, end = context.exchange_started, context.exchange_ended
    # Busy from 1 to 5 (4 s, not 2 + 3), then from 7 to 7.5.
    timeline = [(1.0, start), (2.0, start), (4.0, end), (5.0, end), (7.0, start), (7.5, end)]
    for moment, event in timeline:
        now[0] = moment
        event()
    assert context.upstream_seconds == 4.5


def _exposition(text: bytes) -> list[str]:
    """The gateway's own lines, each ``_created`` time masked (series are made at
    different instants in two registries)."""
    lines = [line for line in text.decode().splitlines() if "flux_proxy_" in line]
    return [re.sub(r"(_created(\{[^}]*\})?) \S+$", r"\1 <time>", line) for line in lines]


def _feed(metrics: Metrics) -> None:
    # Every metric the loop's plain numbers keep, through the API the gateway uses.
    requests = Children(metrics.requests, GENERATIONS)
    requests("200", "image_generation", "up", "openai").inc()
    requests("200", "image_generation", "up", "openai").inc()
    requests("502", "image_generation", "unknown", "").inc()
    for route, seconds in [(GENERATIONS, 0.3), (GENERATIONS, 2.5), ("/v1/models", 900.0)]:
        metrics.request_seconds.labels(route).observe(seconds)  # 2.5: on a bound; 900: +Inf
    for overhead in (0.0, 0.0005, 0.0012, 7.0):
        metrics.overhead_seconds.labels(GENERATIONS).observe(overhead)
    in_flight = metrics.in_flight.labels(GENERATIONS)
    in_flight.inc()
    in_flight.inc()
    in_flight.dec()
    metrics.in_flight.labels("/metrics").inc()
    metrics.upstream_seconds.labels("openai").observe(0.04)
    metrics.upstream_requests.labels("openai", "200").inc()
    metrics.upstream_requests.labels("openai", "error").inc()
    for width in (1, 1, 4, 17):
        metrics.fanout_width.observe(width)
    metrics.images.labels("up", "url").inc(2)
    metrics.image_bytes.labels("up", "b64_json").inc(12345)
    metrics.image_seconds.labels("transcode", "webp").observe(0.02)
    BreakerMetrics(metrics).skipped(UpstreamId("openai", "up", "http://127.0.0.1:9/v1"))


@pytest.mark.parametrize("render", [generate_latest, openmetrics.generate_latest])
def test_the_loops_plain_numbers_expose_what_prometheus_clients_own_would(render, tmp_path):
    # Across workers (a shared directory) every metric is prometheus_client's own; its
    # registry, rendered in this process, is the exposition to match.
    reference = Metrics({MULTIPROCESS_DIR_ENV: str(tmp_path)})
    assert isinstance(reference.requests, Counter)
    loop = Metrics({})
    assert not isinstance(loop.requests, Counter)
    before = _exposition(render(loop.registry))
    assert before == _exposition(render(reference.registry))  # no series yet, but HELP/TYPE
    assert "flux_proxy_fanout_width_count 0.0" in before  # unlabelled: one series at once
    _feed(reference)
    _feed(loop)
    expected = _exposition(render(reference.registry))
    assert 'flux_proxy_request_duration_seconds_bucket{http_route="/v1/models",le="+Inf"} 1.0' in (
        expected
    )
    assert _exposition(render(loop.registry)) == expected
    lines = render(loop.registry).decode().splitlines()
    created = [line for line in lines if "_created" in line and not line.startswith("#")]
    assert created and all(float(line.rsplit(" ", 1)[1]) > 1.7e9 for line in created)


def test_image_work_observed_from_many_threads_is_all_counted():
    metrics = Metrics({})
    jobs = 400
    worker = ImageWorker(4, seconds=metrics.image_seconds)

    async def run_all() -> None:
        timed = [worker.run(sum, (1, 2), timed_as=("resize", "png")) for _ in range(jobs)]
        assert await asyncio.gather(*timed) == [3] * jobs

    asyncio.run(run_all())
    families = text_string_to_metric_families(metrics.render(None).decode())
    counts = [
        sample.value
        for family in families
        for sample in family.samples
        if sample.name == "flux_proxy_image_processing_seconds_count"
    ]
    assert counts == [jobs]


def test_without_created_series_neither_side_writes_them(tmp_path):
    # prometheus_client's switch (PROMETHEUS_DISABLE_CREATED_SERIES at import) holds for
    # the loop's series too.
    disable_created_metrics()  # type: ignore[no-untyped-call]
    try:
        reference = Metrics({MULTIPROCESS_DIR_ENV: str(tmp_path)})
        loop = Metrics({})
        _feed(reference)
        _feed(loop)
        expected = _exposition(generate_latest(reference.registry))
        assert not [line for line in expected if "_created" in line]
        assert _exposition(generate_latest(loop.registry)) == expected
    finally:
        enable_created_metrics()  # type: ignore[no-untyped-call]
