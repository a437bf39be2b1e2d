"""The gateway under load while its upstreams fail: every request answered, well formed,
and nothing left behind between rounds.

    python -m tests.benchmarks.load_faults            # 3 rounds of 2,000 requests at c=100
    python -m tests.benchmarks.load_faults --quick    # 2 rounds of 40 at c=8: seconds

Two fault-injecting OpenAI Images upstreams (tests/faulty_upstream.py, each in its own
process) serve a model with failover from one to the other; each answers ``--fault-rate``
(5%) of its requests with a 500, a 429, a connection reset (TCP RST) or a slow answer (1 s
late), evenly mixed and seeded. flux-proxy runs as users start it (``flux-proxy serve``),
and a closed loop of ``--concurrency`` aiohttp clients sends ``--requests`` requests a
round for 64x64 PNGs as ``b64_json``, half to the failover model and half to one served by
the first upstream alone (so faults also reach the client).

After each round it prints the answers by status, the malformed ones (a 200 without
exactly the images asked for, decoded; an error without OpenAI's error shape or with a
status the faults cannot explain), the unanswered ones (no answer within 60 s, or the
connection failed), and the gateway's open file descriptors (and how many of them are
kept-alive connections to the upstreams) and resident memory. It
stops by itself, and exits 1 when any answer is malformed or missing or when descriptors
(besides that pool, bounded by its limit) or memory after the last round are more than
10% above the first round's.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import sys
import tempfile
import time
from collections import Counter
from contextlib import suppress
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from PIL import Image

from tests.benchmarks.processes import Cpus, Server, free_port
from tests.openapi import assert_matches

SIDE = 64
# What faults can explain: the upstream's 429, 502 for its 500s and resets (the failover
# model only when both upstreams failed), 503 when a circuit is open, 504 a deadline.
EXPLAINED = {429, 502, 503, 504}
DRIFT_LIMIT = 0.10
ANSWER_TIMEOUT = 60.0


@dataclass(frozen=True, slots=True)
class Plan:
    requests: int
    concurrency: int
    rounds: int
    fault_rate: float


FULL = Plan(requests=2000, concurrency=100, rounds=3, fault_rate=0.05)
QUICK = Plan(requests=40, concurrency=8, rounds=2, fault_rate=0.2)


@dataclass(slots=True)
class Round:
    number: int
    seconds: float
    statuses: dict[str, int]
    malformed: int
    unanswered: int
    open_fds: int
    pooled: int  # of open_fds, the gateway's kept-alive connections to the upstreams
    rss_mib: float
    examples: list[str]  # the first few malformed or unanswered, to see what went wrong


def gateway_config(first: str, second: str) -> dict[str, Any]:
    def entry(url: str) -> dict[str, Any]:
        return {
            "provider": "openai",
            "base_url": f"{url}/v1",
            "upstream_model": "faulty",
            "options": {"response_format": "b64_json"},
        }

    return {
        "server": {"health_paths": True},
        "models": {
            "failover": {"providers": [entry(first), entry(second)]},
            "single": {"providers": [entry(first)]},
        },
    }


async def one_request(session: aiohttp.ClientSession, url: str, index: int) -> tuple[str, str]:
    """("200", "") for a good answer; else its status and what was wrong ("" when nothing)."""
    model = "failover" if index % 2 else "single"
    body = {
        "model": model,
        "prompt": f"load {index}",
        "size": f"{SIDE}x{SIDE}",
        "response_format": "b64_json",
    }
    try:
        async with session.post(url, json=body) as response:
            status, text = response.status, await response.text()
    except (aiohttp.ClientError, TimeoutError) as error:
        return "unanswered", f"{type(error).__name__}: {error}"
    return str(status), _malformation(status, text)


def _malformation(status: int, text: str) -> str:
    try:
        payload = json.loads(text)
        if status == 200:
            assert_matches(payload, "ImagesResponse")
            (item,) = payload["data"]
            data = base64.b64decode(item["b64_json"], validate=True)
            Image.open(io.BytesIO(data)).verify()  # every chunk and its CRC, to the end
            image = Image.open(io.BytesIO(data))
            image.load()
            if (image.format, image.size) != ("PNG", (SIDE, SIDE)):
                return f"200 with a {image.format} {image.size}"
            return ""
        assert_matches(payload, "ErrorResponse")
    except Exception as error:  # any way the answer is not what it must be
        return f"{status}: {type(error).__name__}: {str(error)[:200]}"
    if status not in EXPLAINED:
        return f"{status} that no injected fault explains: {text[:200]}"
    return ""


@dataclass(slots=True)
class Outcome:
    statuses: Counter[str]
    malformed: list[str]
    unanswered: list[str]
    seconds: float = 0.0


async def drive(url: str, plan: Plan) -> Outcome:
    timeout = aiohttp.ClientTimeout(total=ANSWER_TIMEOUT)
    connector = aiohttp.TCPConnector(limit=plan.concurrency)
    outcome = Outcome(Counter(), [], [])
    next_index = 0
    started = time.perf_counter()
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:

        async def worker() -> None:
            nonlocal next_index
            while next_index < plan.requests:
                index, next_index = next_index, next_index + 1
                status, problem = await one_request(session, url, index)
                outcome.statuses[status] += 1
                if status == "unanswered":
                    outcome.unanswered.append(problem)
                elif problem:
                    outcome.malformed.append(problem)

        await asyncio.gather(*(worker() for _ in range(plan.concurrency)))
    outcome.seconds = time.perf_counter() - started
    return outcome


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def pooled_connections(pid: int, ports: set[int]) -> int:
    """How many of the process's sockets are TCP connections to ``ports``: its keep-alive
    pool to the upstreams, whose size depends on how the last requests overlapped."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with suppress(OSError):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith("socket:["):
                inodes.add(target[len("socket:[") : -1])
    count = 0
    for table in ("tcp", "tcp6"):
        with suppress(OSError):
            for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
                fields = line.split()  # sl, local, remote, state, ..., inode (10th)
                if fields[9] in inodes and int(fields[2].rsplit(":", 1)[1], 16) in ports:
                    count += 1
    return count


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def fetch_json(url: str) -> Any:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        return await response.json()


async def run(plan: Plan, work: Path) -> tuple[list[Round], dict[str, Any]]:
    cpus = Cpus.choose()
    parent = str(os.getpid())
    upstreams = [
        Server(
            f"faulty upstream {n}",
            [
                *(sys.executable, "-m", "tests.faulty_upstream", "--port", str(port)),
                *("--rate", str(plan.fault_rate), "--seed", str(n), "--parent", parent),
            ],
            port,
            work / f"upstream{n}.log",
            cpus.other,
        )
        for n, port in enumerate((free_port(), free_port()), start=1)
    ]
    config = work / "gateway.yaml"
    config.write_text(yaml.safe_dump(gateway_config(upstreams[0].url, upstreams[1].url)))
    port = free_port()
    gateway = Server(
        "flux-proxy",
        [
            *(sys.executable, "-m", "flux_proxy", "serve", "--config", str(config)),
            *("--port", str(port), "--log-level", "error"),
        ],
        port,
        work / "gateway.log",
        cpus.server,
        env={"FLUX_PROXY_API_KEYS": ""},
        ready_path="/healthz",
    )
    servers = [*upstreams, gateway]
    try:
        for server in servers:
            server.start()
        await asyncio.gather(*(server.wait_ready() for server in servers))
        rounds = []
        url = f"{gateway.url}/v1/images/generations"
        for number in range(1, plan.rounds + 1):
            outcome = await drive(url, plan)
            await asyncio.sleep(1.0)  # let closed connections and finished tasks settle
            rounds.append(
                Round(
                    number=number,
                    seconds=outcome.seconds,
                    statuses=dict(sorted(outcome.statuses.items())),
                    malformed=len(outcome.malformed),
                    unanswered=len(outcome.unanswered),
                    open_fds=open_fds(gateway.pid),
                    pooled=pooled_connections(gateway.pid, {u.port for u in upstreams}),
                    rss_mib=rss_mib(gateway.pid),
                    examples=(outcome.malformed + outcome.unanswered)[:5],
                )
            )
            print(describe(rounds[-1], plan), flush=True)
        injected = {u.name: await fetch_json(f"{u.url}/stats") for u in upstreams}
        return rounds, injected
    finally:
        for server in servers:
            server.stop()


def describe(result: Round, plan: Plan) -> str:
    answers = ", ".join(f"{status} x{count}" for status, count in result.statuses.items())
    line = (
        f"round {result.number}: {plan.requests} requests at c={plan.concurrency} in "
        f"{result.seconds:.1f} s ({plan.requests / result.seconds:.0f} req/s): {answers}; "
        f"malformed {result.malformed}, unanswered {result.unanswered}; "
        f"open fds {result.open_fds} ({result.pooled} of them pooled upstream connections), "
        f"RSS {result.rss_mib:.1f} MiB"
    )
    return line + "".join(f"\n    {example}" for example in result.examples)


def drift(rounds: list[Round]) -> dict[str, float]:
    first, last = rounds[0], rounds[-1]
    return {
        # The pool's size is how the last requests overlapped, bounded by its limit: the
        # other descriptors are what a leak would grow.
        "open_fds": (last.open_fds - last.pooled) / (first.open_fds - first.pooled) - 1,
        "rss": last.rss_mib / first.rss_mib - 1,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny rounds, for a smoke test")
    parser.add_argument("--requests", type=int)
    parser.add_argument("--concurrency", type=int)
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--fault-rate", type=float)
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args(argv)
    base = QUICK if args.quick else FULL
    plan = Plan(
        requests=args.requests or base.requests,
        concurrency=args.concurrency or base.concurrency,
        rounds=args.rounds or base.rounds,
        fault_rate=base.fault_rate if args.fault_rate is None else args.fault_rate,
    )
    with tempfile.TemporaryDirectory(prefix="flux-load-faults-") as work:
        rounds, injected = asyncio.run(run(plan, Path(work)))
    changes = drift(rounds)
    for name, served in injected.items():
        print(f"{name} served: " + ", ".join(f"{k} x{v}" for k, v in sorted(served.items())))
    verdict = {
        "malformed": sum(r.malformed for r in rounds),
        "unanswered": sum(r.unanswered for r in rounds),
        "drift": changes,
    }
    drifted = not args.quick and any(value > DRIFT_LIMIT for value in changes.values())
    print(
        f"after round {rounds[-1].number} against round 1: open fds besides the pool "
        f"{changes['open_fds']:+.1%}, "
        f"RSS {changes['rss']:+.1%} (limit +{DRIFT_LIMIT:.0%}"
        + (", not checked with --quick)" if args.quick else ")")
    )
    failed = verdict["malformed"] or verdict["unanswered"] or drifted
    print("FAIL" if failed else "PASS")
    if args.json:
        report = {"plan": asdict(plan), "rounds": [asdict(r) for r in rounds], **verdict}
        args.json.write_text(json.dumps({**report, "injected": injected}, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
