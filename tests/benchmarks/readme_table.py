"""The README's benchmark tables, from a run's ``--json`` file.

    python -m tests.benchmarks.readme_table bench.json

Prints the (a)/(b) table (req/s and p50 per target and concurrency, the ratios to the
aiohttp forwarder and the server's CPU time per request at the middle level, peak
memory at the highest) and the targets' table, as Markdown, so the README's figures
are always laid out the same way.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# Row order and names in the README.
TARGETS = {
    "upstream": "upstream direct",
    "aiohttp": "thin forwarder, aiohttp",
    "httpx": "thin forwarder, httpx",
    "flux-pass": "flux-proxy, upstream URLs returned",
    "flux-default": "flux-proxy, default (hosted url)",
    "litellm": "LiteLLM (--peers)",
}
MARKS = {True: "PASS", False: "MISS", None: "n/a"}


def _cell(row: dict[str, Any] | None) -> str:
    if row is None:
        return "-"
    rps = f"{row['rps']:,.0f}" if row["rps"] >= 100 else f"{row['rps']:.1f}"
    return f"{rps} ({row['p50_ms']:.1f})"


def tables(report: dict[str, Any]) -> str:
    rows = {(r["group"], r["target"], r["concurrency"]): r for r in report["scenarios"]}
    low, mid, high = report["plan"]["levels"]
    groups = list(dict.fromkeys(r["group"] for r in report["scenarios"]))
    url, b64 = groups[0], groups[1]  # (a) and (b), always first
    header = f"| req/s (p50 ms) | (a) url c={low} | c={mid} | c={high} | (b) b64 c={low} |"
    header += f" c={mid} | c={high} | x aiohttp (a), (b) c={mid} | CPU ms/req (a), (b) c={mid} |"
    header += f" peak RSS (b) c={high} |"
    lines = [header, "|---|" + "---:|" * 9]
    for target, name in TARGETS.items():
        if not any(key[1] == target for key in rows):
            continue
        cells = [_cell(rows.get((g, target, c))) for g in (url, b64) for c in (low, mid, high)]
        ratios = [rows.get((g, target, mid), {}).get("ratio_to_aiohttp") for g in (url, b64)]
        ratio = ", ".join("-" if r is None else f"{r:.3f}" for r in ratios)
        ratio = "-" if ratios == [None, None] else ratio
        cpus = [rows.get((g, target, mid), {}).get("cpu_ms_per_request") for g in (url, b64)]
        cpu = ", ".join("-" if c is None else f"{c:.2f}" for c in cpus)
        peak = rows.get((b64, target, high))
        memory = "-" if peak is None else f"{peak['peak_rss_mib']:.0f} MiB"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {ratio} | {cpu} | {memory} |")
    lines += ["", "| issue 7 target | measured | |", "|---|---|---|"]
    for verdict in report["targets"]:
        lines.append(f"| {verdict['target']} | {verdict['measured']} | {MARKS[verdict['met']]} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("report", type=Path, help="a bench_gateway --json file")
    args = parser.parse_args(argv)
    print(tables(json.loads(args.report.read_text())))


if __name__ == "__main__":
    main()
