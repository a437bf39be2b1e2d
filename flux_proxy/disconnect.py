"""Stopping work nobody is waiting for any more."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

from starlette.types import Receive

from flux_proxy.deadline import running_task

T = TypeVar("T")


async def unless_disconnected(receive: Receive, work: Callable[[], Awaitable[T]]) -> T | None:
    """Run ``work``; if the client disconnects first, cancel it and return None.

    ASGI servers do not cancel a request's task when its client goes away, so
    without this an abandoned request would keep its upstream task (and its
    bill) running to the end. ``receive`` must already have delivered the body.

    The work runs in the caller's task; a watcher, a plain asyncio task stopped when
    the work ends, cancels that task on a disconnect. The cancel is told from any
    other (a shutdown's, the caller's own) the way ``asyncio.timeout`` tells its own:
    by the task's count of cancel requests, so only this one is turned into None. An
    anyio cancel scope would do the same but costs far more on every request (each
    of its steps asks sniffio which event loop runs, and its ``cancel()`` formats the
    task's repr); the gateway runs on asyncio anyway (aiohttp's pool).
    """
    task = running_task()
    watcher = asyncio.create_task(_cancel_on_disconnect(receive, task))
    try:
        return await work()
    except asyncio.CancelledError:
        # The watcher has finished only by cancelling this task (it is stopped below
        # otherwise); a cancel requested besides its own stays in force.
        if _cancelled_the_task(watcher) and task.uncancel() == 0:
            return None
        raise
    finally:
        watcher.cancel()


async def _cancel_on_disconnect(receive: Receive, task: asyncio.Task[object]) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
    task.cancel("the client disconnected")


def _cancelled_the_task(watcher: asyncio.Task[None]) -> bool:
    """Whether ``watcher`` saw the disconnect and cancelled its task: it finishes only
    so, unless it was stopped or ``receive`` failed."""
    return watcher.done() and not watcher.cancelled() and watcher.exception() is None
