"""The benchmark's processes: started pinned to a CPU, waited for, measured, stopped.

Each process gets a free loopback port, its own session (so stopping it stops its
children too) and a log file that is shown when it fails to start. Peak memory is
the kernel's high-water mark (``VmHWM``), reset before each scenario through
``/proc/PID/clear_refs`` so every scenario reports its own peak. CPU time is the
kernel's count of user and system time (``/proc/PID/stat``), which other work on a
shared machine barely moves, unlike wall-clock throughput.
"""

from __future__ import annotations

import asyncio
import math
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

import httpx

STARTUP_TIMEOUT = 90.0


class BenchmarkError(Exception):
    """The benchmark could not measure what it claims to (bad answer, server failed)."""


@dataclass(frozen=True, slots=True)
class Cpus:
    """Where things run: each server on ``server`` and everything else on ``other``."""

    server: int | None
    other: int | None

    @staticmethod
    def choose() -> Cpus:
        if not hasattr(os, "sched_getaffinity"):
            return Cpus(None, None)
        allowed = sorted(os.sched_getaffinity(0))
        return Cpus(allowed[0], allowed[-1])

    def describe(self) -> str:
        if self.server is None:
            return "no CPU pinning (os.sched_setaffinity unavailable)"
        if self.server == self.other:
            return f"one CPU ({self.server}) for everything: ratios mean little"
        return (
            f"each server pinned to CPU {self.server} (one measured at a time); "
            f"upstream, load generator and harness on CPU {self.other}"
        )


def pinned(cpu: int | None) -> Callable[[], None] | None:
    """A ``preexec_fn`` that pins the child before it execs: all its threads inherit it."""
    if cpu is None:
        return None
    return lambda: os.sched_setaffinity(0, {cpu})


def run_quick(module: str, report: Path) -> subprocess.CompletedProcess[str]:
    """Run ``python -m module --quick --json report`` from the checkout, as a smoke test
    does; the output is captured, and a failure says what the run printed."""
    completed = subprocess.run(
        [sys.executable, "-m", module, "--quick", "--json", str(report)],
        cwd=Path(__file__).resolve().parents[2],
        capture_output=True,
        text=True,
        timeout=120,  # a hang guard, not a measurement
        check=False,
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    return completed


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Server:
    """One server process on loopback, started by ``start`` and ended by ``stop``."""

    def __init__(
        self,
        name: str,
        command: Sequence[str],
        port: int,
        log: Path,
        cpu: int | None,
        env: Mapping[str, str] | None = None,
        ready_path: str = "/health",
    ) -> None:
        self.name = name
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self._command = list(command)
        self._log = log
        self._cpu = cpu
        self._env = {**os.environ, **(env or {})}
        self._ready_path = ready_path
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self._log.open("wb") as log:
            self._process = subprocess.Popen(
                self._command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self._env,
                start_new_session=True,
                preexec_fn=pinned(self._cpu),  # the parent starts no threads before this
            )

    @property
    def pid(self) -> int:
        if self._process is None:
            raise BenchmarkError(f"{self.name} was never started")
        return self._process.pid

    def output(self) -> str:
        return self._log.read_text(errors="replace")[-3000:]

    async def wait_ready(self) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        async with httpx.AsyncClient(timeout=2.0) as client:
            while time.monotonic() < deadline:
                if self._process is None or self._process.poll() is not None:
                    raise BenchmarkError(f"{self.name} exited at start-up:\n{self.output()}")
                with suppress(httpx.HTTPError):
                    if (await client.get(self.url + self._ready_path)).status_code < 500:
                        return
                await asyncio.sleep(0.1)
        raise BenchmarkError(
            f"{self.name} did not start in {STARTUP_TIMEOUT:g} s:\n{self.output()}"
        )

    def reset_peak_memory(self) -> None:
        for pid in self._tree():
            with suppress(OSError):
                Path(f"/proc/{pid}/clear_refs").write_text("5")

    def peak_memory_mib(self) -> float:
        """Peak resident memory of the process and its children, since the last reset."""
        total_kib = 0
        for pid in self._tree():
            with suppress(OSError):
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        total_kib += int(line.split()[1])
        return total_kib / 1024

    def cpu_seconds(self) -> float:
        """User plus system CPU time the process and its children have used so far
        (NaN where ``/proc`` cannot tell)."""
        ticks, seen = 0, False
        for pid in self._tree():
            with suppress(OSError, IndexError, ValueError):
                # After the command's closing parenthesis: utime and stime are the 12th
                # and 13th fields (stat's 14th and 15th).
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                ticks += int(fields[11]) + int(fields[12])
                seen = True
        return ticks / os.sysconf("SC_CLK_TCK") if seen else math.nan

    def _tree(self) -> list[int]:
        pids, index = [self.pid], 0
        while index < len(pids):
            with suppress(OSError):
                for task in Path(f"/proc/{pids[index]}/task").iterdir():
                    pids += [int(child) for child in (task / "children").read_text().split()]
            index += 1
        return pids

    def stop(self) -> None:
        if self._process is None or self._process.poll() is not None:
            return
        with suppress(ProcessLookupError):
            os.killpg(self._process.pid, signal.SIGTERM)
        try:
            self._process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            with suppress(ProcessLookupError):
                os.killpg(self._process.pid, signal.SIGKILL)
            self._process.wait(timeout=5)
