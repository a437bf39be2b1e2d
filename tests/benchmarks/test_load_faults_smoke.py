"""Keep the load run with faults working: run it tiny, and check its answer checker.

No figure is asserted: ``--quick`` only has to end with every answer well formed and
every request answered, with faults really injected (20% of upstream requests here).
"""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import pytest

from tests.benchmarks.load_faults import SIDE, _malformation
from tests.benchmarks.processes import run_quick
from tests.images import make_image


def test_the_quick_load_run_answers_everything_well(tmp_path: Path) -> None:
    report_path = tmp_path / "load.json"
    completed = run_quick("tests.benchmarks.load_faults", report_path)
    report = json.loads(report_path.read_text())
    assert report["malformed"] == 0 and report["unanswered"] == 0
    assert len(report["rounds"]) == 2
    for round_ in report["rounds"]:
        assert sum(round_["statuses"].values()) == report["plan"]["requests"]
        assert 0 <= round_["pooled"] < round_["open_fds"] and round_["rss_mib"] > 0
    served = report["injected"]["faulty upstream 1"]
    assert served.get("ok", 0) > 0 and sum(served.values()) > served["ok"]  # faults happened
    assert len(re.findall(r"malformed 0, unanswered 0", completed.stdout)) == 2


def _images(*images: bytes) -> str:
    data = [{"b64_json": base64.b64encode(image).decode()} for image in images]
    return json.dumps({"created": 1, "data": data})


ERROR = json.dumps({"error": {"message": "x", "type": "server_error", "param": None, "code": None}})


@pytest.mark.parametrize(
    ("status", "text"),
    [
        (200, _images(make_image("png", (SIDE, SIDE))[:-20])),  # truncated
        (200, _images(make_image("png", (SIDE, SIDE + 1)))),  # another size
        (200, _images(make_image("png", (SIDE, SIDE)), make_image("png", (SIDE, SIDE)))),
        (200, "not json"),
        (500, ERROR),  # no injected fault explains a 500
        (502, json.dumps({"detail": "not OpenAI's shape"})),
    ],
)
def test_the_checker_catches_a_malformed_answer(status: int, text: str) -> None:
    assert _malformation(status, text)


@pytest.mark.parametrize(
    ("status", "text"),
    [(200, _images(make_image("png", (SIDE, SIDE)))), (502, ERROR), (429, ERROR)],
)
def test_the_checker_passes_a_good_answer(status: int, text: str) -> None:
    assert _malformation(status, text) == ""
