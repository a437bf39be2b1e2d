"""Values worked out once per key and kept, with a bound on how many.

The request path keeps a few small tables of what it would otherwise redo on every
request (parsed endpoint URLs, size plans, public link bases). Their keys come from a
handful of endpoints and models, but some come from what clients send, so each table
is bounded: when full it forgets everything at once, which costs a client that makes
up keys only its own recomputation, and costs nothing on the way to the bound.
"""

from __future__ import annotations

from typing import TypeVar

K = TypeVar("K")
V = TypeVar("V")


class Kept(dict[K, V]):
    """A dict of at most ``limit`` entries: read it as a dict, add to it by :meth:`keep`."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit

    def keep(self, key: K, value: V) -> V:
        """Keep ``value`` for ``key`` (forgetting all others first if full); ``value``."""
        if len(self) >= self.limit:
            self.clear()
        self[key] = value
        return value
