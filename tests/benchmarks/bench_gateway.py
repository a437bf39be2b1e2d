"""What the gateway costs: the same requests sent to a fake upstream directly and through
flux-proxy, in one run, reported as ratios.

    python -m tests.benchmarks.bench_gateway [--requests N] [--concurrency C] [--quick]

Two uvicorn processes on loopback (see ``tests/benchmarks/servers.py``): a fast fake
OpenAI Images upstream that answers from preallocated bodies, and the gateway with one
``openai`` model pointing at it. The gateway gets a CPU to itself; the upstream and
this process (the load generator: ``httpx.AsyncClient``, closed loop) share the other.
So the direct rows are bounded by the client and upstream on their core, and a ratio
near 1.00 means the gateway was not the bottleneck.

Absolute numbers drift between runs and machines; compare the ratios. Every scenario
sends a bounded number of requests and stops after a time cap, whichever comes first,
and its first answer is checked (format, size, the bytes themselves) before timing.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import math
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Coroutine, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import IO, Any, Literal, TypeVar

import httpx
from PIL import Image

from tests.benchmarks.servers import GENERATIONS_PATH, PNG_SIDE, gateway_settings

PROMPT = "a lighthouse at dusk"
WORK_SIZE = (1000, 750)
WORK_CONCURRENCY = 4
STARTUP_TIMEOUT = 30.0

T = TypeVar("T")
Target = Literal["direct", "gateway"]
Kind = Literal["b64", "url", "work"]

# What each group of rows measures (printed under the table).
LEGEND: dict[Kind, str] = {
    "b64": (
        f"{PNG_SIDE}x{PNG_SIDE} PNG, response_format b64_json (~1.4 MB JSON answer). Gateway: "
        "pure pass-through (native size and format); it still parses the upstream JSON, "
        "base64-decodes, probes the header and re-encodes. Bytes are checked identical."
    ),
    "url": (
        "the same request with response_format url. Direct: the upstream returns a link "
        "(tiny answer). Gateway: asks the upstream for b64_json as configured, decodes it, "
        "stores the image and returns its own signed link (tiny answer; the link is "
        "fetched and checked once, not timed)."
    ),
    "work": (
        f"size {WORK_SIZE[0]}x{WORK_SIZE[1]} + output_format webp, b64_json: the gateway "
        f"gets the {PNG_SIDE}x{PNG_SIDE} PNG, then decodes, resizes (Lanczos, cover + crop) "
        "and encodes WebP in its worker threads. Compared with direct b64 at the same "
        "concurrency, so the ratio is mostly the price of that Pillow work on one core."
    ),
}


class BenchmarkError(Exception):
    """The benchmark could not measure what it claims to (bad answer, server failed)."""


@dataclass(frozen=True, slots=True)
class Scenario:
    kind: Kind
    target: Target
    concurrency: int
    requests: int

    @property
    def label(self) -> str:
        return scenario_label(self.kind, self.target, self.concurrency)

    @property
    def baseline(self) -> str | None:
        """The direct row this gateway row is compared with (same concurrency)."""
        if self.target == "direct":
            return None
        kind: Kind = "url" if self.kind == "url" else "b64"
        return scenario_label(kind, "direct", self.concurrency)

    def body(self) -> bytes:
        request: dict[str, Any] = {
            "model": "bench" if self.target == "gateway" else "bench-image",
            "prompt": PROMPT,
            "n": 1,
        }
        if self.kind == "work":
            request |= {"size": f"{WORK_SIZE[0]}x{WORK_SIZE[1]}", "output_format": "webp"}
        else:
            request["size"] = f"{PNG_SIDE}x{PNG_SIDE}"
        request["response_format"] = "url" if self.kind == "url" else "b64_json"
        return json.dumps(request).encode()


def scenario_label(kind: Kind, target: Target, concurrency: int) -> str:
    what = {"b64": "b64", "url": "url", "work": "resize+webp"}[kind]
    return f"{target} {what} c={concurrency}"


@dataclass(frozen=True, slots=True)
class Plan:
    requests: int  # per scenario with a small answer; b64 and image work get fewer
    concurrency: int
    seconds: float  # time cap per scenario (measurement)
    warmup_seconds: float
    # Warm-up requests per scenario; None: twice the concurrency, at least a tenth of
    # the measured requests, at most 200.
    warmup_requests: int | None = None

    def warmup(self, scenario: Scenario) -> int:
        if self.warmup_requests is not None:
            return self.warmup_requests
        return min(max(2 * scenario.concurrency, scenario.requests // 10), 200)

    def scenarios(self) -> list[Scenario]:
        b64 = max(1, self.requests // 4)
        work = max(1, self.requests // 40)
        levels = sorted({1, self.concurrency})
        rows: list[Scenario] = []
        groups: tuple[tuple[Kind, int], ...] = (("b64", b64), ("url", self.requests))
        for kind, count in groups:
            for level in levels:
                rows += [
                    Scenario(kind, "direct", level, count),
                    Scenario(kind, "gateway", level, count),
                ]
        work_levels = sorted({1, WORK_CONCURRENCY})
        rows += [Scenario("b64", "direct", level, b64) for level in work_levels]
        rows += [Scenario("work", "gateway", level, work) for level in work_levels]
        unique: dict[str, Scenario] = {}
        for row in rows:
            unique.setdefault(row.label, row)
        return list(unique.values())


def scenario_rows(concurrency: int) -> dict[str, str | None]:
    """Every row the benchmark prints for this ``--concurrency``: label -> baseline label."""
    return {s.label: s.baseline for s in Plan(1, concurrency, 0.0, 0.0).scenarios()}


@dataclass(slots=True)
class Measured:
    scenario: Scenario
    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    elapsed: float = 0.0

    @property
    def rps(self) -> float:
        return len(self.latencies) / self.elapsed if self.elapsed > 0 else 0.0

    def percentile_ms(self, q: float) -> float:
        """Nearest-rank percentile, in milliseconds."""
        if not self.latencies:
            return math.nan
        ordered = sorted(self.latencies)
        return ordered[max(0, math.ceil(q * len(ordered)) - 1)] * 1000


# --- processes ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Cpus:
    gateway: int | None
    other: int | None  # the upstream and the load generator

    @staticmethod
    def choose() -> Cpus:
        if not hasattr(os, "sched_getaffinity"):
            return Cpus(None, None)
        allowed = sorted(os.sched_getaffinity(0))
        return Cpus(allowed[0], allowed[-1])

    def describe(self) -> str:
        if self.gateway is None:
            return "no CPU pinning (os.sched_setaffinity unavailable)"
        shared = " (the same CPU: results mean little)" if self.gateway == self.other else ""
        return (
            f"gateway on CPU {self.gateway}; upstream and load generator on CPU {self.other}"
            + shared
        )


def _listening_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(1024)
    sock.set_inheritable(True)
    return sock


@contextmanager
def server_process(
    role: str, cpu: int | None, lifetime: float, settings: dict[str, Any] | None = None
) -> Iterator[tuple[str, subprocess.Popen[bytes], IO[bytes]]]:
    """Start ``servers.py ROLE`` on a fresh loopback socket; always kill it afterwards."""
    with tempfile.TemporaryFile() as log:
        sock = _listening_socket()
        port = sock.getsockname()[1]
        command = [
            sys.executable,
            "-m",
            "tests.benchmarks.servers",
            role,
            f"--fd={sock.fileno()}",
            f"--lifetime={lifetime:.0f}",
            f"--parent={os.getpid()}",
            f"--settings={json.dumps(settings or {})}",
        ]
        if cpu is not None:
            command.append(f"--cpu={cpu}")
        try:
            process = subprocess.Popen(
                command, pass_fds=[sock.fileno()], stdout=log, stderr=subprocess.STDOUT
            )
        finally:
            sock.close()  # the child has its own copy; if it dies, connections are refused
        try:
            yield f"http://127.0.0.1:{port}", process, log
        finally:
            process.terminate()
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)


def _output_of(log: IO[bytes]) -> str:
    log.seek(0)
    return log.read().decode(errors="replace")[-2000:]


async def wait_ready(url: str, process: subprocess.Popen[bytes], log: IO[bytes]) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT
    async with httpx.AsyncClient(timeout=2.0) as client:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise BenchmarkError(f"{url} exited with {process.returncode}:\n{_output_of(log)}")
            try:
                if (await client.get(url)).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.05)
    raise BenchmarkError(f"{url} did not start in {STARTUP_TIMEOUT:g} s:\n{_output_of(log)}")


# --- load and checks ------------------------------------------------------------------


async def closed_loop(
    client: httpx.AsyncClient, url: str, body: bytes, scenario: Scenario, count: int, cap: float
) -> Measured:
    """``concurrency`` workers send ``count`` requests in all, or stop at ``cap`` seconds."""
    measured = Measured(scenario)
    remaining = count
    headers = {"content-type": "application/json"}
    started = time.perf_counter()
    stop_at = started + cap

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0 and time.perf_counter() < stop_at:
            remaining -= 1
            sent = time.perf_counter()
            try:
                response = await client.post(url, content=body, headers=headers)
            except httpx.HTTPError:
                measured.errors += 1
                continue
            if response.status_code == 200:
                measured.latencies.append(time.perf_counter() - sent)
            else:
                measured.errors += 1

    await asyncio.gather(*(worker() for _ in range(scenario.concurrency)))
    measured.elapsed = time.perf_counter() - started
    return measured


def _image(data: bytes) -> tuple[str | None, tuple[int, int]]:
    with Image.open(io.BytesIO(data)) as image:
        return image.format, image.size


async def check_answer(
    client: httpx.AsyncClient, scenario: Scenario, response: httpx.Response, reference: bytes
) -> None:
    """Fail unless the answer is what the row claims to measure."""
    where = scenario.label
    if response.status_code != 200:
        raise BenchmarkError(f"{where}: HTTP {response.status_code}: {response.text[:500]}")
    entry = response.json()["data"][0]
    if scenario.kind == "url":
        linked = await client.get(entry["url"])
        if linked.status_code != 200 or linked.content != reference:
            raise BenchmarkError(f"{where}: the linked image is not the upstream's PNG")
    elif scenario.kind == "b64":
        if base64.b64decode(entry["b64_json"]) != reference:
            raise BenchmarkError(f"{where}: the image is not the upstream's PNG, byte for byte")
    elif _image(base64.b64decode(entry["b64_json"])) != ("WEBP", WORK_SIZE):
        raise BenchmarkError(f"{where}: expected a {WORK_SIZE} WebP")
    if scenario.target == "gateway":
        report = json.loads(response.headers["x-flux-proxy-params"])
        size = report.get("size", {}).get("handling")
        expected = "emulated" if scenario.kind == "work" else "passthrough"
        if size != expected:
            raise BenchmarkError(f"{where}: size was {size!r}, expected {expected!r}: {report}")


async def measure(scenario: Scenario, base_url: str, plan: Plan, reference: bytes) -> Measured:
    url = base_url + GENERATIONS_PATH
    body = scenario.body()
    limits = httpx.Limits(
        max_connections=scenario.concurrency, max_keepalive_connections=scenario.concurrency
    )
    async with httpx.AsyncClient(limits=limits, timeout=60.0) as client:
        first = await client.post(url, content=body, headers={"content-type": "application/json"})
        await check_answer(client, scenario, first, reference)
        await closed_loop(client, url, body, scenario, plan.warmup(scenario), plan.warmup_seconds)
        return await closed_loop(client, url, body, scenario, scenario.requests, plan.seconds)


async def reference_png(upstream: str) -> bytes:
    """The upstream's PNG, fetched once: what every pass-through answer must carry."""
    body = Scenario("b64", "direct", 1, 1).body()
    async with httpx.AsyncClient(timeout=30.0) as client:
        response = await client.post(upstream + GENERATIONS_PATH, content=body)
        response.raise_for_status()
        png = base64.b64decode(response.json()["data"][0]["b64_json"])
    if _image(png) != ("PNG", (PNG_SIDE, PNG_SIDE)):
        raise BenchmarkError("the fake upstream did not answer with its 1024x1024 PNG")
    return png


async def run_all(plan: Plan, upstream: str, gateway: str) -> list[Measured]:
    reference = await reference_png(upstream)
    results = []
    for scenario in plan.scenarios():
        base_url = gateway if scenario.target == "gateway" else upstream
        results.append(await measure(scenario, base_url, plan, reference))
    return results


# --- output ---------------------------------------------------------------------------


def _fmt(value: float, digits: int) -> str:
    return "-" if math.isnan(value) else f"{value:.{digits}f}"


def table(results: Sequence[Measured]) -> str:
    by_label = {result.scenario.label: result for result in results}
    header = (
        f"{'scenario':<24} {'n':>5} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'err':>4}"
        f"  {'baseline':<20} {'req/s ratio':>11} {'p50 ratio':>9}"
    )
    lines = [header, "-" * len(header)]
    for result in results:
        baseline_label = result.scenario.baseline
        base = by_label.get(baseline_label) if baseline_label else None
        rps_ratio = p50_ratio = math.nan
        if base is not None and base.rps > 0:
            rps_ratio = result.rps / base.rps
            p50_ratio = result.percentile_ms(0.5) / base.percentile_ms(0.5)
        lines.append(
            f"{result.scenario.label:<24} {len(result.latencies):>5} {result.rps:>8.1f}"
            f" {_fmt(result.percentile_ms(0.5), 2):>8} {_fmt(result.percentile_ms(0.99), 2):>8}"
            f" {result.errors:>4}  {baseline_label or '-':<20}"
            f" {_fmt(rps_ratio, 2):>11} {_fmt(p50_ratio, 2):>9}"
        )
    lines += [
        "",
        "req/s ratio = gateway req/s / baseline req/s (1.00: the gateway costs no throughput);",
        "p50 ratio = gateway p50 / baseline p50 (how many times longer a request takes).",
    ]
    lines += [f"{kind}: {text}" for kind, text in LEGEND.items()]
    return "\n".join(lines)


def _versions() -> str:
    import uvicorn

    return (
        f"Python {platform.python_version()}, httpx {httpx.__version__}, "
        f"uvicorn {uvicorn.__version__}, {os.cpu_count()} CPUs"
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tests.benchmarks.bench_gateway",
        description="Measure the gateway against its upstream, as ratios from one run.",
    )
    parser.add_argument(
        "--requests",
        type=int,
        default=None,
        help="requests per scenario with a small answer (b64: a quarter, image work: 1/40); "
        "default 2000, or 200 with --quick",
    )
    parser.add_argument(
        "--concurrency", type=int, default=16, help="the high concurrency level (default 16)"
    )
    parser.add_argument(
        "--warmup",
        type=int,
        default=None,
        help="warm-up requests per scenario, not measured (default: twice the concurrency, "
        "at least a tenth of --requests, at most 200)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="short time caps and counts (CI smoke run)"
    )
    args = parser.parse_args(argv)
    if args.requests is not None and args.requests < 1:
        parser.error("--requests must be at least 1")
    if args.warmup is not None and args.warmup < 0:
        parser.error("--warmup must be at least 0")
    if args.concurrency < 1:
        parser.error("--concurrency must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    plan = Plan(
        requests=args.requests or (200 if args.quick else 2000),
        concurrency=args.concurrency,
        seconds=0.8 if args.quick else 4.0,
        warmup_seconds=0.2 if args.quick else 0.5,
        warmup_requests=args.warmup,
    )
    scenarios = plan.scenarios()
    # Bounded: every scenario's time caps, plus the start-up, plus slack.
    lifetime = STARTUP_TIMEOUT + len(scenarios) * (plan.seconds + plan.warmup_seconds + 10)
    cpus = Cpus.choose()
    if cpus.other is not None:
        os.sched_setaffinity(0, {cpus.other})
    print(f"flux-proxy gateway benchmark: {_versions()}; {cpus.describe()}", flush=True)
    started = time.monotonic()
    try:
        with ExitStack() as stack:
            upstream, up_process, up_log = stack.enter_context(
                server_process("upstream", cpus.other, lifetime)
            )
            gateway, gw_process, gw_log = stack.enter_context(
                server_process("gateway", cpus.gateway, lifetime, gateway_settings(upstream))
            )

            async def run() -> list[Measured]:
                await wait_ready(upstream + "/health", up_process, up_log)
                await wait_ready(gateway + "/v1/models", gw_process, gw_log)
                return await run_all(plan, upstream, gateway)

            results = _run(run())
    except (BenchmarkError, httpx.HTTPError, KeyError, ValueError) as error:
        print(f"benchmark failed: {type(error).__name__}: {error}", file=sys.stderr)
        return 1
    print(table(results))
    print(f"\ntotal {time.monotonic() - started:.1f} s", flush=True)
    errors = sum(result.errors for result in results)
    if errors:
        print(f"benchmark failed: {errors} request(s) did not get HTTP 200", file=sys.stderr)
        return 1
    return 0


def _run(coroutine: Coroutine[Any, Any, T]) -> T:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coroutine)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coroutine)


if __name__ == "__main__":
    sys.exit(main())
