"""Large string values kept as bytes: the same answer as parsing it all, or the same error."""

from __future__ import annotations

import base64
import json
import random
from typing import Any

import orjson
import pytest

from flux_proxy import b64
from flux_proxy.json_blobs import Pieces, loads_keeping

TEXT = base64.b64encode(bytes(range(256)) * 40).decode()


def as_parsed(value: Any) -> Any:
    """What a plain parse gives: bytes read back as the text they are."""
    return orjson.loads(orjson.dumps(value, default=lambda text: text.decode("ascii")))


BODIES = {
    "two images": json.dumps({"created": 1, "data": [{"b64_json": TEXT}, {"b64_json": "QUJD"}]}),
    "whitespace around the colon": '{"data": [ {"b64_json" :\n "' + TEXT + '" } ]}',
    "an escaped slash": '{"data": [{"b64_json": "ab\\/cd"}]}',
    "the name inside another string": json.dumps({"revised_prompt": 'say "b64_json": "x"'}),
    "an escaped backslash before the name": json.dumps({"a\\": 1, "b64_json": TEXT}),
    "a value that is no string": '{"b64_json": null, "data": [{"b64_json": 3}]}',
    "the name as a value": json.dumps({"url": "b64_json", "b64_json": TEXT}),
    "the stand-in's own text": json.dumps({"b64_json": "\x00blob:0", "x": TEXT}),
    "a name seen twice": '{"b64_json": "QUJD", "b64_json": "' + TEXT + '"}',
    "nesting": "[" * 200 + '{"b64_json": "QUJD"}' + "]" * 200,
    "a top-level list": json.dumps([{"b64_json": TEXT}]),
}


@pytest.mark.parametrize("base64", [False, True])
@pytest.mark.parametrize("body", BODIES.values(), ids=BODIES.keys())
def test_the_answer_is_what_a_plain_parse_gives(body: str, base64: bool) -> None:
    raw = body.encode()
    kept = loads_keeping(raw, "b64_json", base64=base64)
    assert as_parsed(kept) == orjson.loads(raw)


NO_BASE64 = ["QUJ", "QU=D", "QUJD!", "QU JD", "QQ==QUJD"]


@pytest.mark.parametrize("text", NO_BASE64)
def test_with_base64_only_strict_base64_is_kept_as_bytes(text: str) -> None:
    body = json.dumps({"data": [{"b64_json": text}, {"b64_json": TEXT}]}).encode()
    first, second = loads_keeping(body, "b64_json", base64=True)["data"]
    assert first == {"b64_json": text}  # parsed, as a plain parse gives it
    assert second == {"b64_json": TEXT.encode()}
    # Without base64, any escape-free value is kept.
    assert loads_keeping(body, "b64_json")["data"][0] == {"b64_json": text.encode()}


def test_escape_free_values_of_the_member_are_bytes_and_others_are_not() -> None:
    body = json.dumps(
        {"data": [{"b64_json": TEXT, "revised_prompt": TEXT}, {"b64_json": "ab/cd"}]}
    ).replace("ab/cd", "ab\\/cd")
    first, second = loads_keeping(body.encode(), "b64_json")["data"]
    assert first == {"b64_json": TEXT.encode(), "revised_prompt": TEXT}
    assert second == {"b64_json": "ab/cd"}  # the escape is the parser's to read


def test_a_value_nested_as_deep_as_the_parser_allows_is_found() -> None:
    depth = 1000  # orjson's limit is 1024; Python's recursion limit about as much
    node = loads_keeping(("[" * depth + '{"b64_json": "QUJD"}' + "]" * depth).encode(), "b64_json")
    for _ in range(depth):
        (node,) = node
    assert node == {"b64_json": b"QUJD"}


BROKEN = [
    '{"b64_json": "' + TEXT,  # cut short in the value
    '{"b64_json": "QUJD"',  # cut short after it
    '{"x": "a"b64_json": "QUJD"}',  # the name's first quote closes a string
    '{"b64_json" "QUJD"}',  # no colon
    '{"b64_json": "QUJD"} trailing',
]


@pytest.mark.parametrize("body", BROKEN)
def test_what_is_not_json_is_refused_as_a_plain_parse_refuses_it(body: str) -> None:
    with pytest.raises(orjson.JSONDecodeError):
        orjson.loads(body.encode())
    with pytest.raises(ValueError):
        loads_keeping(body.encode(), "b64_json")


def split(raw: bytes, size: int) -> Pieces:
    return Pieces([raw[at : at + size] for at in range(0, len(raw), size)])


@pytest.mark.parametrize("size", [7, 1000])
@pytest.mark.parametrize("body", BODIES.values(), ids=BODIES.keys())
def test_a_body_in_pieces_reads_as_the_same_body_whole(body: str, size: int) -> None:
    raw = body.encode()
    assert loads_keeping(split(raw, size), "b64_json") == loads_keeping(raw, "b64_json")
    assert loads_keeping(split(raw, size), "b64_json", base64=True) == loads_keeping(
        raw, "b64_json", base64=True
    )


@pytest.mark.parametrize("size", [1, 3, 7])
@pytest.mark.parametrize("body", BROKEN)
def test_a_broken_body_in_pieces_is_refused_too(body: str, size: int) -> None:
    with pytest.raises(ValueError):
        loads_keeping(split(body.encode(), size), "b64_json")


def test_pieces_find_and_cut_as_the_joined_bytes_would() -> None:
    raw = b'ab"\\ab"ba"b\\"a"bab'
    for size in range(1, len(raw) + 1):
        pieces = split(raw, size)
        assert pieces.whole() == raw
        for sub in (b"a", b'"', b'b"', b'\\"a', b'a"bab', b"x"):
            for start in range(len(raw) + 1):
                for end in (start, start + 3, len(raw)):
                    assert pieces.find(sub, start, end) == raw.find(sub, start, end)
        for start in range(len(raw) + 1):
            for end in range(start, len(raw) + 1):
                assert pieces.cut(start, end) == raw[start:end]


def reference_keeping(raw: bytes, written: str) -> Any:
    """What loads_keeping(base64=True) gives for a body whose first value is written
    as ``written``, worked out the long way: kept where it has no escape and is strict
    base64 (checked whole), parsed otherwise."""
    parsed = orjson.loads(raw)
    if "\\" not in written and b64.is_strict(written.encode()):
        parsed["data"][0]["b64_json"] = written.encode()
    parsed["data"][1]["b64_json"] = b"QUJD"
    return parsed


@pytest.mark.parametrize("chunk", [4, 8, 12, 16])
def test_with_base64_what_is_kept_is_what_the_check_of_the_whole_value_passes(
    chunk: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Small pieces, and b64.check's stretches small (a multiple of 4, as it needs), so
    # that groups, padding and the quote fall on every kind of boundary between them.
    monkeypatch.setattr(b64, "CHECK_CHUNK", chunk)
    draw = random.Random(chunk)
    texts = ["", "QQ==", "QUI=", "QUJD", "QQ==QUJD", "QUJDQQ==", "QU=D", "QUJ", "Q", "QUJD!"]
    texts += [
        "".join(draw.choice("QUJD=+/!") for _ in range(draw.randrange(12))) for _ in range(40)
    ]
    for text in texts:
        value = text.replace("!", "\\u0021") if draw.random() < 0.5 else text.replace("!", "\\/")
        raw = ('{"data": [{"b64_json": "' + value + '"}, {"b64_json": "QUJD"}]}').encode()
        expected = reference_keeping(raw, value)
        for size in (1, 2, 3, 7):
            assert loads_keeping(split(raw, size), "b64_json", base64=True) == expected, text
