"""Keep the gateway benchmark working: run it tiny and check it prints every row.

No timing is asserted: the numbers only have to be numbers. The run is as small as
still exercises everything: both server processes, every scenario with its checked
first answer and at least one measured request, a low and a high concurrency level.
Warm-up only matters for the figures, so it is skipped.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from tests.benchmarks.bench_gateway import scenario_rows

ROOT = Path(__file__).resolve().parents[2]
NUMBER = r"\d+(?:\.\d+)?"
# The high concurrency level: above 1, so the concurrent rows are really concurrent.
CONCURRENCY = 2


def test_benchmark_runs_and_prints_every_scenario() -> None:
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.benchmarks.bench_gateway",
            "--quick",
            *("--requests", "4", "--concurrency", str(CONCURRENCY), "--warmup", "0"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,  # a hang guard, not a measurement
        check=False,
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    lines = completed.stdout.splitlines()
    rows = scenario_rows(CONCURRENCY)
    assert len(rows) == 11
    for label, baseline in rows.items():
        measured = rf"{re.escape(label)}\s+(\d+)\s+({NUMBER})\s+({NUMBER})\s+({NUMBER})\s+0\s+"
        if baseline is None:
            pattern = measured + r"-\s+-\s+-$"
        else:
            pattern = measured + rf"{re.escape(baseline)}\s+({NUMBER})\s+({NUMBER})$"
        matches = [m for line in lines if (m := re.fullmatch(pattern, line.strip()))]
        assert len(matches) == 1, f"no row for {label!r} in:\n{completed.stdout}"
        assert int(matches[0][1]) >= 1, f"{label}: no request measured"
