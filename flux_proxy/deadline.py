"""A bound on how long a block of a task may run: ``asyncio.timeout``'s, cheaper.

Every request runs three of them (its body's read, the provider stack, each upstream
exchange). ``asyncio.timeout`` costs several Python frames and two coroutines for each
(``timeout()``, its ``__init__``, ``__aenter__``/``__aexit__``, ``current_task`` and
``reschedule``); :class:`Deadline` is a plain ``with`` block that arms one loop timer
and disarms it, with the same semantics:

- past the bound the task is cancelled, and the cancel is raised as ``TimeoutError``
  where the block is left;
- a cancel that is not the deadline's (a shutdown's, a disconnect's, an enclosing
  deadline's) stays in force: told by the task's count of cancel requests, as
  ``asyncio.timeout`` tells it (``uncancel``);
- nothing is armed for no bound (None), and nothing is left armed once the block is
  left, nor is the task held after.

Not reusable and not reschedulable: one per block.
"""

from __future__ import annotations

import asyncio
import sys
from asyncio import CancelledError, get_running_loop
from collections.abc import Callable
from types import TracebackType

# The task a loop is running, None outside one (asyncio.current_task(loop)).
task_of: Callable[[asyncio.AbstractEventLoop], asyncio.Task[object] | None]
if sys.version_info >= (3, 12):  # C from 3.12 on
    task_of = asyncio.current_task
else:
    # asyncio.current_task is Python in 3.11, around a lookup in this C dict: the lookup
    # alone, for a caller that holds the running loop.
    task_of = asyncio.tasks._current_tasks.get  # type: ignore[attr-defined]


def running_task() -> asyncio.Task[object]:
    """The task running the caller (``asyncio.current_task()``, one frame less)."""
    task = task_of(get_running_loop())
    if task is None:
        raise RuntimeError("no task runs this: a deadline bounds a task's block")
    return task


class Deadline:
    """``with Deadline(seconds):`` cancels the task running the block when it takes
    longer than ``seconds`` (None: no bound), and raises ``TimeoutError`` from the
    block in place of that cancel."""

    __slots__ = ("_cancelling", "_seconds", "_task", "_timer")

    def __init__(self, seconds: float | None) -> None:
        self._seconds = seconds
        self._task: asyncio.Task[object] | None = None
        self._timer: asyncio.TimerHandle | None = None

    def __enter__(self) -> None:
        seconds = self._seconds
        if seconds is None:
            return
        loop = get_running_loop()
        task = task_of(loop)
        if task is None:
            raise RuntimeError("no task runs this: a deadline bounds a task's block")
        self._task = task
        # Cancels already requested are not this deadline's to take back.
        self._cancelling = task.cancelling()
        self._timer = loop.call_at(loop.time() + seconds, self._expire)

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        timer = self._timer
        if timer is not None:  # left in time: the timer has not fired
            timer.cancel()
            self._timer = None
            self._task = None
            return
        task = self._task
        if task is None:  # no bound
            return
        self._task = None
        # Expired: its cancel taken back; raised as the timeout only when no other
        # cancel was asked for since the block began.
        outstanding = task.uncancel()
        del task  # this frame is in the TimeoutError's traceback: it holds no task
        if outstanding <= self._cancelling and kind is CancelledError:
            raise TimeoutError from error

    def _expire(self) -> None:
        self._timer = None
        task = self._task
        assert task is not None
        task.cancel()
