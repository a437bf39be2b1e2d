"""Stopping work nobody is waiting for any more."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

from starlette.types import Receive

from flux_proxy.deadline import running_task
from flux_proxy.eager import Pending, eagerly

T = TypeVar("T")


async def unless_disconnected(receive: Receive, work: Callable[[], Awaitable[T]]) -> T | None:
    """Run ``work``; if the client disconnects first, cancel it and return None.

    ASGI servers do not cancel a request's task when its client goes away, so
    without this an abandoned request would keep its upstream task (and its
    bill) running to the end. ``receive`` must already have delivered the body.

    The work runs in the caller's task; a watcher (:class:`_Watch`) cancels that task
    on a disconnect. The cancel is told from any other (a shutdown's, the caller's
    own) the way ``asyncio.timeout`` tells its own: by the task's count of cancel
    requests, so only this one is turned into None. An anyio cancel scope would do the
    same but costs far more on every request (each of its steps asks sniffio which
    event loop runs, and its ``cancel()`` formats the task's repr); the gateway runs on
    asyncio anyway (aiohttp's pool).
    """
    task = running_task()
    watch = _Watch(receive, task)
    try:
        return await work()
    except asyncio.CancelledError:
        # A cancel requested besides the watcher's own stays in force.
        if watch.cancelled_task and task.uncancel() == 0:
            return None
        raise
    finally:
        watch.stop()


class _Watch:
    """Waits for ``receive`` to say the client left, beside the work, and cancels the
    work's task then.

    Its first step runs at once, in the caller, as a Python 3.12 eager task's does: up
    to where ``receive`` waits (uvicorn's, on an asyncio.Event's future). Only when
    that future wakes it is the rest handed to a task; in the usual end, the work done
    first, the wait is closed where it stands and no task is made at all (a task made
    and cancelled for every request cost about 2% of a url pass-through's
    instructions). A ``receive`` that waits otherwise (a bare yield) is handed to a
    task at once, as before."""

    __slots__ = ("_coroutine", "_waiting", "_watcher", "cancelled_task")

    def __init__(self, receive: Receive, task: asyncio.Task[Any]) -> None:
        self.cancelled_task = False
        self._waiting: asyncio.Future[Any] | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._coroutine: Coroutine[Any, Any, None] | None = None
        try:
            first = eagerly(self._watch(receive, task))
        except Exception:  # receive failed: the work goes on unwatched, as it would have
            return
        if not isinstance(first, Pending):  # the client had left already: task cancelled
            return
        waiting = first.waiting
        self._coroutine = first.coroutine
        if getattr(waiting, "_asyncio_future_blocking", False):
            # What a task does with the future a coroutine awaits: wait for it.
            waiting._asyncio_future_blocking = False
            waiting.add_done_callback(self._woken)
            self._waiting = waiting
        else:
            self._watcher = asyncio.get_running_loop().create_task(first.coroutine)

    async def _watch(self, receive: Receive, task: asyncio.Task[Any]) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        self.cancelled_task = True
        task.cancel("the client disconnected")

    def _woken(self, waiting: asyncio.Future[Any]) -> None:
        """The awaited future is done: a task resumes the watch where it waits."""
        self._waiting = None
        coroutine = self._coroutine
        if coroutine is not None:
            self._watcher = asyncio.get_running_loop().create_task(coroutine)

    def stop(self) -> None:
        """Stop watching: the work has ended."""
        waiting = self._waiting
        coroutine = self._coroutine
        self._coroutine = None  # the coroutine's frame holds this watch: no cycle left
        if waiting is not None:
            self._waiting = None
            waiting.remove_done_callback(self._woken)
            assert coroutine is not None
            # GeneratorExit where receive waits: its own clean-up runs (uvicorn's takes
            # its future off the Event's waiters), as a cancel's would.
            coroutine.close()
        elif self._watcher is not None:
            self._watcher.cancel()
