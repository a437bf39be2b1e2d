"""flux_proxy.eager: a coroutine's first step at once; its rest awaited as it would be."""

from __future__ import annotations

import asyncio

import pytest

from flux_proxy.eager import Pending, eagerly

pytestmark = pytest.mark.anyio


async def test_a_coroutine_that_never_waits_gives_its_result_at_once():
    async def ready() -> str:
        return "body"

    assert eagerly(ready()) == "body"


async def test_one_that_waits_is_pending_and_its_rest_runs_when_awaited():
    future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    steps: list[str] = []

    async def waits() -> str:
        steps.append("first")
        got = await future
        await asyncio.sleep(0)  # a bare yield too
        steps.append("rest")
        return got + "!"

    pending = eagerly(waits())
    assert isinstance(pending, Pending)
    assert steps == ["first"]
    asyncio.get_running_loop().call_soon(future.set_result, "body")
    assert await pending == "body!"
    assert steps == ["first", "rest"]


async def test_a_failure_in_the_first_step_is_raised_by_eagerly():
    async def fails() -> None:
        raise ValueError("too large")

    with pytest.raises(ValueError, match="too large"):
        eagerly(fails())


async def test_a_cancel_while_pending_reaches_the_coroutine_and_goes_on():
    started = asyncio.Event()
    cleaned: list[str] = []

    async def waits_long() -> None:
        try:
            await asyncio.sleep(10)
        finally:
            cleaned.append("finally")

    async def caller() -> None:
        pending = eagerly(waits_long())
        assert isinstance(pending, Pending)
        started.set()
        await pending

    task = asyncio.create_task(caller())
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert cleaned == ["finally"]
