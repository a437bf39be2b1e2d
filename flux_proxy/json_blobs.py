"""JSON answers whose large strings stay bytes: the base64 of an image is not parsed.

An OpenAI Images answer is a few hundred bytes of JSON around megabytes of base64.
Parsing it whole builds a Python ``str`` of every image (orjson: about 2 ms for a
1 MP image here, as much as a bare proxy spends on the whole request) only for the
gateway to encode it back to ASCII bytes. Here the values of one named member are
cut out of the body first, kept as the body's own bytes, and the small rest is
parsed as usual.

Why a value cut out is exactly the string JSON would give: the member's name is
found with its quotes, and the first quote is a delimiter (an even number of
backslashes before it); after the colon comes a quote that opens the value, and
the value runs to the next quote. A value holding a backslash (an escape) is left
to the parser, so what is cut out is the string as it is. Where the name's first
quote only looked like an opening delimiter (it closed an earlier string), the body
is not JSON, and the rest, still holding that, fails to parse too. A value is not
checked here beyond that; the base64 it should be is checked where it is used.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import orjson

_WHITESPACE = frozenset(b" \t\r\n")
_QUOTE, _COLON, _BACKSLASH = 0x22, 0x3A, 0x5C
# What stands in the parsed rest for the i-th value cut out: "\u0000blob:i", which
# the rest is checked not to hold already.
_MARK = "\x00blob:"
_MARK_JSON = b"\\u0000blob:"


def loads_keeping(body: bytes, member: str) -> Any:
    """``orjson.loads(body)``, except that every escape-free string value of a member
    named ``member`` is ``bytes`` (its text in the body). Raises ValueError (orjson's
    JSONDecodeError) for a body that is not JSON."""
    values: list[bytes] = []
    rest: list[bytes] = []
    name = b'"' + member.encode() + b'"'
    kept = searched = 0
    while (found := body.find(name, searched)) != -1:
        searched = found + len(name)
        start = _value_start(body, found, searched)
        if start is None:
            continue
        end = body.find(b'"', start)
        if end == -1 or body.find(b"\\", start, end) != -1:
            continue  # unterminated (the parser says so) or escaped: parsed as usual
        rest += (body[kept:start], _MARK_JSON, str(len(values)).encode(), b'"')
        values.append(body[start:end])
        kept = searched = end + 1
    if not values:
        return orjson.loads(body)
    rest.append(body[kept:])
    joined = b"".join(rest)
    if joined.count(_MARK_JSON) != len(values):
        # The body holds the stand-in's text itself (only the small rest is searched: a
        # value cut out has no backslash, so cannot hold it): parse it all instead.
        return orjson.loads(body)
    parsed = orjson.loads(joined)
    if _put_back(parsed, member, values) != len(values):
        # Not every stand-in came back as that member's whole value; cannot happen by
        # the reasoning above, and if it did, the plain parse is the right answer.
        return orjson.loads(body)
    return parsed


def _value_start(body: bytes, name_at: int, after_name: int) -> int | None:
    """Where the string value of the member named at ``name_at`` starts (past its
    opening quote), or None where this is not a member name followed by a string."""
    backslashes = 0
    while name_at - backslashes > 0 and body[name_at - backslashes - 1] == _BACKSLASH:
        backslashes += 1
    if backslashes % 2:
        return None  # an escaped quote: inside a string
    at = _skip_whitespace(body, after_name)
    if at >= len(body) or body[at] != _COLON:
        return None
    at = _skip_whitespace(body, at + 1)
    if at >= len(body) or body[at] != _QUOTE:
        return None
    return at + 1


def _skip_whitespace(body: bytes, at: int) -> int:
    while at < len(body) and body[at] in _WHITESPACE:
        at += 1
    return at


def _put_back(parsed: Any, member: str, values: list[bytes]) -> int:
    """Replace each stand-in that is ``member``'s value with its bytes; how many were.
    A walk with its own stack: the rest may nest as deep as orjson allows."""
    count = 0
    stack = [parsed] if isinstance(parsed, dict | list) else []
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            value = node.get(member)
            if isinstance(value, str) and value.startswith(_MARK):
                node[member] = values[int(value[len(_MARK) :])]
                count += 1
            children: Iterable[Any] = node.values()
        else:
            children = node
        stack.extend(child for child in children if isinstance(child, dict | list))
    return count
