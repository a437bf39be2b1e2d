"""Stopping work nobody is waiting for any more."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

import anyio
from starlette.types import Receive

T = TypeVar("T")


async def unless_disconnected(receive: Receive, work: Callable[[], Awaitable[T]]) -> T | None:
    """Run ``work``; if the client disconnects first, cancel it and return None.

    ASGI servers do not cancel a request's task when its client goes away, so
    without this an abandoned request would keep its upstream task (and its
    bill) running to the end. ``receive`` must already have delivered the body.

    The work runs in the caller's task, inside a cancel scope that only a disconnect
    cancels; the watcher is a plain asyncio task, stopped with ``Task.cancel`` when
    the work ends. An anyio task group would do the same but costs far more on every
    request: its ``cancel()`` formats the repr of the current task (about a tenth of
    a url pass-through's CPU). The gateway runs on asyncio anyway (aiohttp's pool).
    """
    with anyio.CancelScope() as scope:
        watcher = asyncio.create_task(_cancel_on_disconnect(receive, scope))
        try:
            return await work()
        finally:
            watcher.cancel()
    return None  # reached only when the scope was cancelled: the client went away


async def _cancel_on_disconnect(receive: Receive, scope: anyio.CancelScope) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
    scope.cancel()
