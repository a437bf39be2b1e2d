"""A coroutine's first step run at once, in the caller, with no task of its own.

Where a wait is usually not needed (the request's body has mostly arrived with its
head), what bounds the wait (a timer) need only be armed when the coroutine does
wait: :func:`eagerly` runs it up to its first wait, and hands back either its result
or a :class:`Pending` whose awaiting runs the rest in the caller's task.
"""

from __future__ import annotations

from collections.abc import Coroutine, Generator
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class Pending(Generic[T]):
    """The rest of a coroutine that is waiting: await it (once) to run the rest."""

    __slots__ = ("coroutine", "waiting")

    def __init__(self, coroutine: Coroutine[Any, Any, T], waiting: Any) -> None:
        self.coroutine = coroutine  # suspended at its first wait
        self.waiting = waiting  # what it yielded: the future it waits on, or None

    def __await__(self) -> Generator[Any, Any, T]:
        # ``yield from``, by hand: the coroutine is in the middle of an await already
        # (awaiting it again is refused), and what it waits on goes up first.
        coroutine = self.coroutine
        waiting = self.waiting
        self.waiting = None
        try:
            while True:
                try:
                    sent = yield waiting
                except BaseException as error:  # a cancel, say: the coroutine's to handle
                    waiting = coroutine.throw(error)
                else:
                    waiting = coroutine.send(sent)
        except StopIteration as done:  # the coroutine returned (a yield raises no such)
            return done.value  # type: ignore[no-any-return]


def eagerly(coroutine: Coroutine[Any, Any, T]) -> T | Pending[T]:
    """``coroutine``'s result, where it finishes without waiting; else its rest."""
    try:
        waiting = coroutine.send(None)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]
    return Pending(coroutine, waiting)
