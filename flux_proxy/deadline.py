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

A loop timer costs more than the rest of a deadline (made, started, stopped, closed
and freed in uvloop: ~7,000 instructions). :class:`Deadlines` lets the deadlines of
one bound share one: made one after another, they end in the order they are made, so
one timer at the first live one's end serves them all, moved on only when it fires
(about once per bound) or when none is left. Each Deadline still ends at its own
time.
"""

from __future__ import annotations

import asyncio
import sys
from asyncio import CancelledError, get_running_loop
from collections import deque
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


def running_task(loop: asyncio.AbstractEventLoop | None = None) -> asyncio.Task[object]:
    """The task running the caller (``asyncio.current_task()``, one frame less), on
    ``loop`` when the caller holds it already."""
    task = task_of(loop or get_running_loop())
    if task is None:
        raise RuntimeError("no task runs this: a deadline bounds a task's block")
    return task


class Deadline:
    """``with Deadline(seconds):`` cancels the task running the block when it takes
    longer than ``seconds`` (None: no bound), and raises ``TimeoutError`` from the
    block in place of that cancel. With ``shared``, its timer is its bound's there."""

    __slots__ = ("_cancelling", "_seconds", "_shared", "_task", "armed", "when")

    def __init__(self, seconds: float | None, shared: Deadlines | None = None) -> None:
        self._seconds = seconds
        self._shared = shared
        self._task: asyncio.Task[object] | None = None
        # While it is pending (its block not left, its time not up): its own timer, or
        # the lane it waits in (either's cancel() says it is left in time).
        self.armed: asyncio.TimerHandle | _Lane | None = None

    def __enter__(self) -> None:
        seconds = self._seconds
        if seconds is None:
            return
        loop = get_running_loop()
        task = self._task = running_task(loop)
        # Cancels already requested are not this deadline's to take back.
        self._cancelling = task.cancelling()
        when = self.when = loop.time() + seconds
        shared = self._shared
        if shared is None:
            self.armed = loop.call_at(when, self.expire)
        else:
            lane = shared.lanes.get((loop, seconds))
            if lane is None:
                lane = shared.open(loop, seconds)
            self.armed = lane
            lane.add(self)

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        armed = self.armed
        if armed is not None:  # left in time: not expired
            self.armed = None
            self._task = None  # for a lane: this one is left (see _Lane.cancel)
            armed.cancel()
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

    def expire(self) -> None:
        """Its time is up (its timer's, or its lane's, call): cancel its task."""
        self.armed = None
        task = self._task
        assert task is not None
        task.cancel()


class Deadlines:
    """Timers shared by the deadlines given it (``Deadline(seconds, shared)``): one per
    bound and loop (see the module). One per gateway: its bounds are few."""

    __slots__ = ("lanes",)

    def __init__(self) -> None:
        self.lanes: dict[tuple[asyncio.AbstractEventLoop, float], _Lane] = {}

    def open(self, loop: asyncio.AbstractEventLoop, seconds: float) -> _Lane:
        """The lane of ``seconds`` on ``loop``, made; those of loops closed since, gone
        (an app served by one loop, then another: what they held ended with them)."""
        for key in list(self.lanes):  # made at once: another loop's thread may add one
            if key[0].is_closed():
                self.lanes.pop(key, None)
        lane = self.lanes[(loop, seconds)] = _Lane(loop)
        return lane


class _Lane:
    """One loop's deadlines of one bound, in the order they end (that they began in):
    one timer, at or before the first live one's end."""

    __slots__ = ("_live", "_loop", "_queue", "_timer")

    # Deadlines left in time stay queued behind a live one until it is gone: past this
    # many more than are live (and twice as many), the queue is swept.
    SLACK = 64

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._queue: deque[Deadline] = deque()
        self._live = 0
        self._timer: asyncio.TimerHandle | None = None

    def add(self, deadline: Deadline) -> None:
        self._queue.append(deadline)
        self._live += 1
        if self._timer is None:
            self._timer = self._loop.call_at(deadline.when, self._fire)

    def cancel(self) -> None:
        """One of its deadlines was left in time (its armed cleared): let go of those at
        the head that are; no timer once none is live."""
        self._live -= 1
        queue = self._queue
        while queue and queue[0].armed is None:
            queue.popleft()
        if not queue:
            timer = self._timer
            if timer is not None:
                timer.cancel()
                self._timer = None
        elif len(queue) > 2 * self._live + self.SLACK:
            self._queue = deque(deadline for deadline in queue if deadline.armed is not None)

    def _fire(self) -> None:
        """Expire every deadline whose time is up; the timer moves to the next live one."""
        self._timer = None
        queue = self._queue
        now = self._loop.time()
        while queue:
            head = queue[0]
            if head.armed is None:
                queue.popleft()
            elif head.when <= now:
                queue.popleft()
                self._live -= 1
                head.expire()
            else:
                self._timer = self._loop.call_at(head.when, self._fire)
                return
