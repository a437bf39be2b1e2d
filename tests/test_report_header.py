"""The report header stays under its cap, and building it costs work linear in its input.

Sixty 250,000-character parameter names once cost sixty encodings of the whole report
(1.2 s of a blocked event loop); the work is counted here in characters encoded, not
timed.
"""

from __future__ import annotations

import json

import pytest

from flux_proxy import schema
from flux_proxy.schema import Report


def report_of(names: list[str]) -> Report:
    report = Report()
    for name in names:
        report.record(name, "passthrough", "sent unchanged to the provider")
    return report


def longest_prefix_that_fits(names: list[str]) -> dict[str, object]:
    """What the header must hold once details are dropped, found by trying every length."""
    for kept in range(len(names), -1, -1):
        body: dict[str, object] = {name: {"handling": "passthrough"} for name in names[:kept]}
        body["_truncated"] = len(names) - kept
        if len(json.dumps(body, separators=(",", ":"))) <= Report.MAX_HEADER:
            return body
    raise AssertionError("not even the count fits")


def test_sixty_huge_names_are_encoded_a_bounded_number_of_times(monkeypatch):
    encoded: list[int] = []
    original = schema._compact

    def counting(value: dict[str, object]) -> str:
        text = original(value)
        encoded.append(len(text))
        return text

    monkeypatch.setattr(schema, "_compact", counting)
    names = [f"p{i:02d}" + "x" * 250_000 for i in range(60)]
    header = report_of(names).header_value(names)

    assert json.loads(header) == {"_truncated": 60}  # no name fits under the cap
    # Once with details, once without: the old loop encoded the report 60 times over.
    assert sum(encoded) <= 3 * sum(map(len, names))


@pytest.mark.parametrize(
    ("count", "length"),
    [(1, 7_990), (1, 8_000), (40, 150), (300, 100), (64, 7_000), (2, 3_970), (500, 3)],
)
def test_the_header_keeps_the_longest_prefix_that_fits(count, length):
    names = [f"{i:03d}" + "n" * length for i in range(count)]
    header = report_of(names).header_value(names)
    assert len(header) <= Report.MAX_HEADER
    decoded = json.loads(header)
    if "_truncated" not in decoded:  # it all fitted, details and all
        assert list(decoded) == names
        return
    assert decoded == longest_prefix_that_fits(names)
    assert list(decoded)[:-1] == names[: len(decoded) - 1]  # in the client's order


def test_non_ascii_names_are_measured_as_sent():
    # ensure_ascii turns each "é" into six characters: the cap holds for what is sent.
    names = [f"{i}" + "é" * 400 for i in range(30)]
    header = report_of(names).header_value(names)
    assert header.isascii()
    assert len(header) <= Report.MAX_HEADER
    assert json.loads(header) == longest_prefix_that_fits(names)


@pytest.mark.parametrize(
    "name",
    ["plain", "del\x7f", "tab\tnewline\n", "nul\x00", "caf\u00e9", "lone\ud800", "\U0001f600"],
)
def test_the_header_is_printable_ascii_whatever_the_names(name):
    header = report_of([name]).header_value([name])
    assert all(0x20 <= ord(c) <= 0x7E for c in header), header
    assert json.loads(header) == {
        name: {"handling": "passthrough", "detail": "sent unchanged to the provider"}
    }
