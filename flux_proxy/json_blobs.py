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
checked here beyond that, unless it should be base64 (``base64=True``): then only
strict base64 is kept, checked here, where the check is the one pass over the value
that also shows it holds no escape (the alphabet has no backslash); a 1 MP image's
separate scan for a backslash cost about 0.1 ms. The order is the cheapest measured:
the quote found (memchr), the value copied, then checked while the copy is in
cache; checking the pieces first and looking for the quote only where the check
failed, or stretch by stretch, read colder memory and cost 10-25% more (1, 4 MP).

The body may come as the pieces it was read in (``Pieces``): searched where they
lie, so that a value is the one copy made of its bytes. Joining the pieces first,
then cutting the value out, copied each image twice (about 0.1 ms per 1 MP image).
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterable, Sequence
from itertools import accumulate
from typing import Any

import orjson

from flux_proxy import b64

_WHITESPACE = frozenset(b" \t\r\n")
_QUOTE, _COLON, _BACKSLASH = 0x22, 0x3A, 0x5C
# What stands in the parsed rest for the i-th value cut out: "\u0000blob:i", which
# the rest is checked not to hold already.
_MARK = "\x00blob:"
_MARK_JSON = b"\\u0000blob:"


class Pieces:
    """A body held as the pieces it was read in, searched and cut as if it were one."""

    def __init__(self, pieces: Sequence[bytes]) -> None:
        self._pieces = [piece for piece in pieces if piece]
        # Where each piece starts in the body, and (last) where the body ends.
        self._starts = [0, *accumulate(map(len, self._pieces))]
        self.length = self._starts[-1]

    def whole(self) -> bytes:
        """The body in one piece (no copy where it is one already)."""
        return b"".join(self._pieces)

    def byte(self, at: int) -> int:
        index = bisect_right(self._starts, at) - 1
        return self._pieces[index][at - self._starts[index]]

    def cut(self, start: int, end: int) -> bytes:
        """The body's bytes ``start:end``: one copy of them, wherever they lie."""
        if start >= end:
            return b""
        first = bisect_right(self._starts, start) - 1
        last = bisect_right(self._starts, end - 1) - 1
        if first >= last:
            return self._pieces[first][start - self._starts[first] : end - self._starts[first]]
        parts: list[bytes | memoryview] = [
            memoryview(self._pieces[first])[start - self._starts[first] :]
        ]
        parts += self._pieces[first + 1 : last]
        parts.append(memoryview(self._pieces[last])[: end - self._starts[last]])
        return b"".join(parts)

    def find(self, sub: bytes, start: int, end: int | None = None) -> int:
        """The first index of ``sub`` at or after ``start`` (ending by ``end``), or -1."""
        end = self.length if end is None else min(end, self.length)
        if start >= end:
            return -1
        index = bisect_right(self._starts, start) - 1
        while index < len(self._pieces):
            base = self._starts[index]
            if base >= end:
                break
            piece = self._pieces[index]
            found = piece.find(sub, max(start - base, 0), end - base)
            if found != -1:
                return base + found
            # One that starts in this piece's last bytes and runs on into the next.
            seam = self._starts[index + 1] - len(sub) + 1
            if len(sub) > 1 and index + 1 < len(self._pieces):
                seam = max(seam, start)
                found = self.cut(seam, min(seam + 2 * len(sub) - 2, end)).find(sub)
                if found != -1:
                    return seam + found
            index += 1
        return -1


def loads_keeping(body: bytes | Pieces, member: str, *, base64: bool = False) -> Any:
    """``orjson.loads(body)``, except that every escape-free string value of a member
    named ``member`` is ``bytes`` (its text in the body); with ``base64``, every such
    value that is strict base64 (``b64.check``), and only those. Raises ValueError
    (orjson's JSONDecodeError) for a body that is not JSON."""
    pieces = body if isinstance(body, Pieces) else Pieces([body])
    values: list[bytes] = []
    rest: list[bytes] = []
    name = b'"' + member.encode() + b'"'
    kept = searched = 0
    while (found := pieces.find(name, searched)) != -1:
        searched = found + len(name)
        start = _value_start(pieces, found, searched)
        if start is None:
            continue
        end = pieces.find(b'"', start)
        if end == -1:
            continue  # unterminated: the parser says so
        if base64:
            value = pieces.cut(start, end)
            if not b64.is_strict(value):
                continue  # escaped, or no base64: parsed as usual
        elif pieces.find(b"\\", start, end) != -1:
            continue  # escaped: parsed as usual
        else:
            value = pieces.cut(start, end)
        rest += (pieces.cut(kept, start), _MARK_JSON, str(len(values)).encode(), b'"')
        values.append(value)
        kept = searched = end + 1
    if not values:
        return orjson.loads(pieces.whole())
    rest.append(pieces.cut(kept, pieces.length))
    joined = b"".join(rest)
    if joined.count(_MARK_JSON) != len(values):
        # The body holds the stand-in's text itself (only the small rest is searched: a
        # value cut out has no backslash, so cannot hold it): parse it all instead.
        return orjson.loads(pieces.whole())
    parsed = orjson.loads(joined)
    if _put_back(parsed, member, values) != len(values):
        # Not every stand-in came back as that member's whole value; cannot happen by
        # the reasoning above, and if it did, the plain parse is the right answer.
        return orjson.loads(pieces.whole())
    return parsed


def _value_start(body: Pieces, name_at: int, after_name: int) -> int | None:
    """Where the string value of the member named at ``name_at`` starts (past its
    opening quote), or None where this is not a member name followed by a string."""
    backslashes = 0
    while name_at - backslashes > 0 and body.byte(name_at - backslashes - 1) == _BACKSLASH:
        backslashes += 1
    if backslashes % 2:
        return None  # an escaped quote: inside a string
    at = _skip_whitespace(body, after_name)
    if at >= body.length or body.byte(at) != _COLON:
        return None
    at = _skip_whitespace(body, at + 1)
    if at >= body.length or body.byte(at) != _QUOTE:
        return None
    return at + 1


def _skip_whitespace(body: Pieces, at: int) -> int:
    while at < body.length and body.byte(at) in _WHITESPACE:
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
