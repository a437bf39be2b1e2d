"""Keep the benchmark working: run it tiny and check that every target answered correctly.

No timing is asserted: the figures only have to exist. ``--quick`` uses tiny images
and a couple of requests per scenario, so the run takes seconds, yet starts every
process (upstream, both forwarders, both flux-proxy configurations) and checks the
first answer of every scenario. h2load drives it where installed, else the Python
fallback generator (CI does not install h2load).
"""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import httpx
import pytest

from flux_proxy.imaging import decode, encode
from tests.benchmarks.bench_gateway import (
    QUICK,
    Ask,
    BenchmarkError,
    Scenario,
    check_answer,
    raw_pillow_encode,
)
from tests.benchmarks.load import H2Load, Load
from tests.benchmarks.processes import run_quick
from tests.benchmarks.readme_table import TARGETS, tables
from tests.benchmarks.servers import bench_png


def test_benchmark_runs_and_every_target_answers_correctly(tmp_path: Path) -> None:
    report_path = tmp_path / "bench.json"
    completed = run_quick("tests.benchmarks.bench_gateway", report_path)
    written = json.loads(report_path.read_text())
    rows = {row["label"]: row for row in written["scenarios"]}
    assert sorted(rows) == sorted(s.label for s in QUICK.scenarios())
    targets = {row["target"] for row in rows.values()}
    assert targets == {"upstream", "aiohttp", "httpx", "flux-pass", "flux-default"}
    for label, row in rows.items():
        assert row["first_answer_checked"], label
        assert row["requests"] >= 1 and row["errors"] == 0, row
        printed = rf"{re.escape(row['group'])}\s+{row['target']}\s+{row['concurrency']}\s+\d+\s+0\s"
        assert re.search(printed, completed.stdout, re.MULTILINE), label
    # (a) at c=1 again, the forwarder and flux-pass in turn: the added latency's verdict.
    pairs = written["latency_pairs"]
    assert len(pairs) == QUICK.latency_pairs >= 1
    for pair in pairs:
        assert pair["forwarder_p50_ms"] > 0 and pair["flux_p50_ms"] > 0, pair
        assert pair["added_ms"] == pytest.approx(pair["flux_p50_ms"] - pair["forwarder_p50_ms"])
    assert "(a) url c=1, in turn" in completed.stdout
    # (d) in turns: a gateway answer timed after each raw encode.
    for fmt in ("webp", "avif"):
        gateway_ms = written["encode_turns_gateway_ms"][fmt]
        assert len(gateway_ms) == QUICK.encode_repeats and min(gateway_ms) > 0, gateway_ms
    assert len(written["targets"]) >= 9
    for verdict in written["targets"]:
        assert verdict["target"] in completed.stdout
    # The README's tables come from the same file: a row per target, a line per verdict.
    markdown = tables(written)
    for target in targets:
        assert f"| {TARGETS[target]} |" in markdown
    assert markdown.count("| PASS |") + markdown.count("| MISS |") + markdown.count("| n/a |") == (
        len(written["targets"])
    )


def _answer(images: list[bytes]) -> httpx.Response:
    data = [{"b64_json": base64.b64encode(image).decode()} for image in images]
    return httpx.Response(200, json={"created": 1, "data": data})


@pytest.mark.anyio
async def test_a_wrong_answer_fails_the_run() -> None:
    """A fast answer with other bytes, a truncated image or too few images is caught."""
    png = bench_png(64)
    scenario = Scenario("(b)", Ask("b64_json", 64, "b64"), "flux-pass", 1, None)
    async with httpx.AsyncClient() as client:
        await check_answer(client, scenario, _answer([png]), {64: png})  # the right one passes
        for wrong in ([png[:-12]], [bench_png(65)], []):
            with pytest.raises(BenchmarkError):
                await check_answer(client, scenario, _answer(wrong), {64: png})
        webp = Scenario("(d)", Ask("b64_json", 64, "b64", output_format="webp"), "x", 1, None)
        with pytest.raises(BenchmarkError, match="expected"):
            await check_answer(client, webp, _answer([png]), {64: png})


@pytest.mark.parametrize("fmt", ["webp", "avif"])
def test_the_raw_encode_baseline_is_the_work_the_gateway_does(fmt: str) -> None:
    """(d) compares the gateway with Pillow alone: a fair baseline makes the same file
    from the same PNG (same parameters), neither tuned down nor doing less."""
    png = bench_png(64)
    assert raw_pillow_encode(png, fmt) == encode(decode(png), fmt, None)


@pytest.mark.parametrize(
    ("finished", "rps"), [("2.00s", 1.0), ("500ms", 4.0), ("900us", 2222.2), ("900µs", 2222.2)]
)
def test_h2load_elapsed_time_is_read_in_any_unit_it_prints(finished: str, rps: float) -> None:
    """A counted run's rate comes from h2load's elapsed time, in whatever unit it chose."""
    summary = f"finished in {finished}, 1.00 req/s, 1KB/s\nrequests: 2 total, 2 started\n"
    log = "1\t200\t180\n2\t200\t211\n"
    measured = H2Load._parse(summary, log, Load(concurrency=1, seconds=0.0, warmup=0.0, requests=2))
    assert measured.rps == pytest.approx(rps, rel=1e-3)


def test_h2load_results_count_failures_but_not_requests_cut_off_at_the_end() -> None:
    log = "1\t200\t2000\n2\t200\t4000\n3\t502\t100\n4\t0\t9000\n"
    summary = (
        "finished in 2.00s, 1.00 req/s, 1KB/s\n"
        "requests: 5 total, 5 started, 4 done, 2 succeeded, 2 failed, 1 errored, 0 timeout\n"
    )
    measured = H2Load._parse(summary, log, Load(concurrency=2, seconds=2.0, warmup=0.0))
    assert (measured.requests, measured.rps, measured.p50_ms) == (2, 1.0, 2.0)
    assert measured.failures == {"HTTP 502": 1, "no answer (2 failed, 1 errored, 0 timeout)": 1}
