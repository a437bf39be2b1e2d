"""Stopping work nobody is waiting for any more."""

from __future__ import annotations

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
    """
    outcome: list[T] = []
    failure: list[Exception] = []
    async with anyio.create_task_group() as group:

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            group.cancel_scope.cancel()

        group.start_soon(watch)
        try:
            outcome.append(await work())
        except Exception as error:  # re-raised bare below, not inside an ExceptionGroup
            failure.append(error)
        group.cancel_scope.cancel()
    if failure:
        raised = failure.pop()
        try:
            raise raised
        finally:
            # The traceback holds this frame, and the frame held the error: a cycle that
            # kept all the failed request held (a refused gigabyte answer, say) alive
            # until a full garbage collection, hundreds of requests later.
            del raised
    return outcome.pop() if outcome else None
