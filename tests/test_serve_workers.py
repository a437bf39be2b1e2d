"""``flux-proxy serve --workers N`` shares metrics and links; ``--log-format json``: real
processes on loopback (tests/test_shutdown.py drains workers)."""

from __future__ import annotations

import json
import re
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import yaml

from tests.images import assert_image
from tests.metrics import scrape
from tests.servers import serve
from tests.test_cli import (
    clean_environ,
    free_port,
    spawn,
    wait_until_serving,
)
from tests.upstream_openai import RecordingUpstream, gateway_config

__all__ = ["spawn"]  # the fixture, shared with tests/test_cli.py

GENERATIONS = "/v1/images/generations"
# Requests go out in rounds of this many at once, on fresh connections, until both
# workers have answered some (a connection goes to whichever worker accepts it first,
# and one idle worker tends to take every request sent one at a time), at most
# MAX_ROUNDS rounds.
AT_ONCE = 8
MAX_ROUNDS = 15
# Three processes import the gateway at once; on a loaded machine that takes a while.
START_TIMEOUT = 90.0


def wait_until_up(server: Any, base_url: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        assert server.process.poll() is None, server.output()
        try:
            if httpx.get(f"{base_url}/v1/models", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.1)
    raise AssertionError(f"no answer within {START_TIMEOUT:g} s:\n{server.output()}")


def write_config(tmp_path: Path, settings: dict[str, Any]) -> Path:
    path = tmp_path / "flux-proxy.yaml"
    path.write_text(yaml.safe_dump(settings))
    return path


def worker_pids(run_dirs: list[Path]) -> set[str]:
    """The processes that wrote metric values: prometheus-client names files by pid."""
    return {
        match.group(1)
        for directory in run_dirs
        for path in directory.glob("*.db")
        if (match := re.search(r"_(\d+)\.db$", path.name))
    }


def test_workers_share_the_port_the_metrics_and_the_signing_key(spawn, tmp_path):
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    settings = {
        "server": {"port": port, "workers": 2},
        "store": {"backend": "directory", "directory": str(tmp_path / "images")},
    }
    config = write_config(tmp_path, settings)
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    # No signing key set: the parent makes one for the run and every worker inherits it.
    server = spawn("serve", "--config", str(config), environ=clean_environ(TMPDIR=str(scratch)))
    wait_until_up(server, base_url)
    run_dirs = list(scratch.glob("flux-proxy-metrics-*"))
    assert len(run_dirs) == 1

    body = {"model": "flux1.1-pro", "prompt": "x", "size": "256x256", "response_format": "url"}

    def generate_and_fetch(_: int) -> None:
        # New connections: either worker may make the link, either may serve it.
        answer = httpx.post(f"{base_url}{GENERATIONS}", json=body, timeout=60)
        assert answer.status_code == 200, answer.text
        link = httpx.get(answer.json()["data"][0]["url"], timeout=60)
        assert link.status_code == 200, link.text  # signed by one worker, verified by any
        assert_image(link.content, "png", (256, 256))

    rounds = 0
    with ThreadPoolExecutor(AT_ONCE) as pool:
        while rounds < MAX_ROUNDS and (rounds < 2 or len(worker_pids(run_dirs)) < 2):
            list(pool.map(generate_and_fetch, range(AT_ONCE)))
            rounds += 1
    assert len(worker_pids(run_dirs)) == 2, "only one worker ever answered"
    generated = fetched = rounds * AT_ONCE

    metrics = scrape(base_url)
    requests = "flux_proxy_requests_total"
    assert metrics.value(requests, http_route=GENERATIONS, http_response_status_code="200") == (
        generated
    )
    files = "/v1/images/files/{name}"
    assert metrics.value(requests, http_route=files, http_response_status_code="200") == fetched
    assert metrics.value(requests, http_route="/v1/models") == 1  # the start-up check
    assert metrics.value("flux_proxy_images_total") == generated
    # The scrape is in flight in one worker; nothing else is, in either.
    assert metrics.value("flux_proxy_requests_in_flight") == 1
    assert metrics.value("flux_proxy_store_images") == generated
    # Histograms too are summed over both workers' files.
    route = {"http_route": GENERATIONS}
    assert metrics.value("flux_proxy_request_duration_seconds_count", **route) == generated
    assert metrics.value("flux_proxy_overhead_seconds_count", **route) == generated
    assert metrics.value("flux_proxy_fanout_width_bucket", le="1.0") == generated

    assert server.stop() == -signal.SIGTERM  # re-raised, as one process does
    assert list(scratch.glob("flux-proxy-metrics-*")) == []  # the run's directory is gone
    assert "FLUX_PROXY_SIGNING_KEY is not set: the 2 workers share a key" in server.output()


def test_json_logs_one_line_per_request_and_upstream_exchange_without_secrets(spawn, tmp_path):
    key = "sk-upstream-SECRET-7f3a9"
    recorder = RecordingUpstream()
    with serve(recorder.app()) as upstream:
        port = free_port()
        base_url = f"http://127.0.0.1:{port}"
        settings = {**gateway_config(upstream, answers="url"), "server": {"port": port}}
        settings["models"]["up"]["api_key_env"] = "UPSTREAM_KEY"
        settings["fetch"] = {"allow_private_hosts": ["127.0.0.1"]}
        config = write_config(tmp_path, settings)
        environ = clean_environ(UPSTREAM_KEY=key)
        server = spawn("serve", "--config", str(config), "--log-format", "json", environ=environ)
        assert wait_until_serving(server, base_url).status_code == 200
        request_id = "trace-42"
        answer = httpx.post(
            f"{base_url}{GENERATIONS}",
            json={"model": "up", "prompt": "x", "size": "48x32", "response_format": "url"},
            headers={"x-request-id": request_id},
            timeout=30,
        )
        assert answer.status_code == 200, answer.text
        link = httpx.URL(answer.json()["data"][0]["url"])
        assert httpx.get(link, timeout=30).status_code == 200
        assert server.stop() in (0, -15)
    assert recorder.headers[0]["authorization"] == f"Bearer {key}"  # the key was in use

    output = server.output()
    lines = [json.loads(line) for line in output.splitlines() if line.strip()]
    assert all({"time", "level", "logger", "message"} <= line.keys() for line in lines)
    requests = [line for line in lines if line.get("event") == "request"]
    generation = next(line for line in requests if line["route"] == GENERATIONS)
    assert generation["request_id"] == answer.headers["x-request-id"] == request_id
    assert (generation["status"], generation["model"], generation["provider"]) == (
        200,
        "up",
        "openai",
    )
    assert generation["duration_ms"] >= generation["overhead_ms"] >= 0
    assert generation["upstream_ms"] > 0
    upstream_calls = [line for line in lines if line.get("event") == "upstream"]
    # The provider call and the download of its image, both tagged with the request.
    assert [(c["provider"], c["status"], c["request_id"]) for c in upstream_calls] == [
        ("openai", "200", request_id)
    ] * 2
    assert all("?" not in call["url"] for call in upstream_calls)
    served = next(line for line in requests if line["route"] == "/v1/images/files/{name}")
    assert served["path"] == link.path
    # Neither the key nor any signed link's query reaches the log.
    assert key not in output
    assert link.params["signature"] not in output and "signature=" not in output
