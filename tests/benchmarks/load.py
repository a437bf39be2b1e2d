"""Load generators: closed loop, ``concurrency`` connections each with one request in flight.

``H2Load`` drives h2load (Debian's ``nghttp2-client``, HTTP/1.1), a C client that is far
from the bottleneck; ``PythonLoad`` is an httpx fallback for machines without it (the
CI smoke run), good enough to check answers but too slow for meaningful figures.
Either runs for a duration after a warm-up, or sends a fixed number of requests.
"""

from __future__ import annotations

import asyncio
import math
import re
import shutil
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import httpx

from tests.benchmarks.processes import BenchmarkError


@dataclass(frozen=True, slots=True)
class Load:
    """How long to drive one scenario: ``requests`` in all, or else ``seconds`` after
    ``warmup`` seconds."""

    concurrency: int
    seconds: float
    warmup: float
    requests: int | None = None


@dataclass(frozen=True, slots=True)
class Measured:
    requests: int
    errors: int
    rps: float
    p50_ms: float
    p99_ms: float
    failures: dict[str, int]  # what went wrong, counted: "HTTP 502", "ReadTimeout", ...

    @staticmethod
    def of(latencies_s: list[float], failures: Counter[str], elapsed: float) -> Measured:
        ordered = sorted(latencies_s)
        return Measured(
            requests=len(ordered),
            errors=failures.total(),
            failures=dict(failures),
            rps=len(ordered) / elapsed if elapsed > 0 else 0.0,
            p50_ms=_percentile(ordered, 0.50) * 1000,
            p99_ms=_percentile(ordered, 0.99) * 1000,
        )


def _percentile(ordered: list[float], q: float) -> float:
    """Nearest rank."""
    if not ordered:
        return math.nan
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


class Generator(Protocol):
    name: str

    async def run(
        self, url: str, body: bytes, headers: Mapping[str, str], load: Load
    ) -> Measured: ...


# The units h2load prints "finished in" with: a short run on a fast machine is not in s.
_SECONDS_PER_UNIT = {"s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6}


class H2Load:
    """h2load, on this process's CPU; latencies come from its per-request log."""

    name = "h2load"

    def __init__(self, executable: str) -> None:
        self._executable = executable

    @staticmethod
    def find() -> str | None:
        return shutil.which("h2load")

    async def run(self, url: str, body: bytes, headers: Mapping[str, str], load: Load) -> Measured:
        with tempfile.TemporaryDirectory(prefix="flux-bench-h2load-") as work:
            body_file, log_file = Path(work, "body"), Path(work, "log")
            await asyncio.to_thread(body_file.write_bytes, body)
            command = [self._executable, "--h1", "-c", str(load.concurrency), "-m", "1"]
            if load.requests is not None:
                command += ["-n", str(max(load.requests, load.concurrency))]
            else:
                command += ["-D", f"{load.seconds:g}", "--warm-up-time", f"{load.warmup:g}"]
            for name, value in headers.items():
                command += ["-H", f"{name}: {value}"]
            command += ["-d", str(body_file), "--log-file", str(log_file), url]
            # Started from this process, h2load inherits its CPU (the generator's).
            process = await asyncio.create_subprocess_exec(
                *command, stdout=subprocess.PIPE, stderr=subprocess.PIPE
            )
            out, err = await process.communicate()
            summary = out.decode(errors="replace")
            if process.returncode != 0:
                raise BenchmarkError(f"h2load failed: {summary}{err.decode(errors='replace')}")
            log = await asyncio.to_thread(log_file.read_text)
            return self._parse(summary, log, load)

    @staticmethod
    def _parse(summary: str, log: str, load: Load) -> Measured:
        """The log has one line per request: start (µs since epoch), status, latency (µs).

        Status 0 is a request still in flight when the duration ran out: not an error,
        and not measured (its latency is only how long it had been waiting)."""
        latencies, failures = [], Counter[str]()
        for line in log.splitlines():
            _, status, micros = line.split("\t")
            if status == "200":
                latencies.append(int(micros) / 1e6)
            elif status != "0":
                failures[f"HTTP {status}"] += 1
        failed = re.search(r"(\d+) failed, (\d+) errored, (\d+) timeout", summary)
        # "failed" counts every failure, "errored" (and "timeout") those without an answer
        # (a reset, a timeout); only the summary has those.
        if failed and int(failed[1]) > failures.total():
            failures[f"no answer ({failed[0]})"] = int(failed[1]) - failures.total()
        finished = re.search(r"finished in ([\d.]+)(s|ms|us|µs)\b", summary)
        if load.requests is None:
            elapsed = load.seconds
        elif finished:
            elapsed = float(finished[1]) * _SECONDS_PER_UNIT[finished[2]]
        else:
            raise BenchmarkError(f"h2load printed no summary: {summary}")
        return Measured.of(latencies, failures, elapsed)


class PythonLoad:
    """httpx clients in this process, for machines without h2load."""

    name = "python (httpx)"

    async def run(self, url: str, body: bytes, headers: Mapping[str, str], load: Load) -> Measured:
        limits = httpx.Limits(max_connections=load.concurrency)
        async with httpx.AsyncClient(limits=limits, timeout=120.0, headers=dict(headers)) as client:
            if load.requests is None:
                await _closed_loop(client, url, body, load.concurrency, None, load.warmup)
            return await _closed_loop(
                client, url, body, load.concurrency, load.requests, load.seconds
            )


async def _closed_loop(
    client: httpx.AsyncClient,
    url: str,
    body: bytes,
    concurrency: int,
    count: int | None,
    seconds: float,
) -> Measured:
    latencies: list[float] = []
    failures = Counter[str]()
    remaining = count if count is not None else math.inf
    started = time.perf_counter()
    stop_at = math.inf if count is not None else started + seconds

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0 and time.perf_counter() < stop_at:
            remaining -= 1
            sent = time.perf_counter()
            try:
                response = await client.post(url, content=body)
            except httpx.HTTPError as error:
                failures[type(error).__name__] += 1
                continue
            if response.status_code == 200:
                latencies.append(time.perf_counter() - sent)
            else:
                failures[f"HTTP {response.status_code}"] += 1

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return Measured.of(latencies, failures, time.perf_counter() - started)
