"""flux_proxy.deadline: asyncio.timeout's semantics, checked on the loop the tests run.

Past its bound a block's task is cancelled and the cancel leaves the block as
TimeoutError; a cancel that is not the deadline's stays a cancel; nothing stays armed
and nothing holds the task once the block is left. Each test runs with the deadline's
own timer and with one its bound shares (Deadlines)."""

from __future__ import annotations

import asyncio
import gc
import weakref
from typing import Any

import pytest

from flux_proxy.deadline import Deadline, Deadlines, running_task

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["own timer", "shared timer"])
def shared(request: pytest.FixtureRequest) -> Deadlines | None:
    return Deadlines() if request.param == "shared timer" else None


def record_timers(monkeypatch: pytest.MonkeyPatch) -> list[asyncio.TimerHandle]:
    """Every timer the running loop arms from here on."""
    loop = asyncio.get_running_loop()
    handles: list[asyncio.TimerHandle] = []
    call_at = loop.call_at

    def recording(when: float, callback: Any, *args: Any, **kwargs: Any) -> asyncio.TimerHandle:
        handle = call_at(when, callback, *args, **kwargs)
        handles.append(handle)
        return handle

    monkeypatch.setattr(loop, "call_at", recording)
    return handles


async def test_a_block_past_its_bound_raises_timeout_error_and_takes_its_cancel_back(shared):
    with pytest.raises(TimeoutError), Deadline(0, shared):
        await asyncio.sleep(10)
    assert running_task().cancelling() == 0
    await asyncio.sleep(0)  # no cancel left pending on the task


async def test_a_block_in_time_leaves_no_timer_armed(monkeypatch, shared):
    armed = record_timers(monkeypatch)
    with Deadline(60, shared):
        await asyncio.sleep(0)
    with pytest.raises(ValueError), Deadline(60, shared):
        raise ValueError("the block's own failure passes as it is")
    assert len(armed) == 2
    assert all(handle.cancelled() for handle in armed)


async def test_no_bound_arms_nothing(monkeypatch, shared):
    armed = record_timers(monkeypatch)
    with Deadline(None, shared):
        await asyncio.sleep(0)
    assert armed == []


async def test_a_cancel_from_outside_stays_a_cancel(shared):
    started = asyncio.Event()

    async def bounded() -> None:
        with Deadline(60, shared):
            started.set()
            await asyncio.sleep(10)

    task = asyncio.create_task(bounded())
    await started.wait()
    task.cancel("shutdown")
    with pytest.raises(asyncio.CancelledError):
        await task
    assert task.cancelled()


async def test_a_cancel_asked_for_while_the_deadline_s_is_handled_stays_in_force(shared):
    async def bounded() -> None:
        with Deadline(0, shared):
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                running_task().cancel("shutdown")  # another cancel, on top of the deadline's
                raise

    task = asyncio.create_task(bounded())
    with pytest.raises(asyncio.CancelledError):
        await task
    assert task.cancelled()


async def test_an_enclosing_deadline_s_expiry_is_its_own(shared):
    inner_raised = False
    with pytest.raises(TimeoutError), Deadline(0, shared):
        try:
            with Deadline(60, shared):
                await asyncio.sleep(10)
        except TimeoutError:
            inner_raised = True
            raise
    assert not inner_raised


async def test_an_inner_deadline_s_expiry_leaves_the_enclosing_block_running(shared):
    with Deadline(60, shared):
        with pytest.raises(TimeoutError), Deadline(0, shared):
            await asyncio.sleep(10)
        await asyncio.sleep(0)  # not cancelled: the inner deadline's cancel was taken back
    assert running_task().cancelling() == 0


async def test_a_deadline_left_in_time_holds_nothing_of_its_task(shared):
    async def bounded() -> str:
        with Deadline(60, shared):
            await asyncio.sleep(0)
        return "done"

    gc.disable()  # only reference counts free it: neither a timer nor a cycle may hold it
    try:
        task = asyncio.create_task(bounded())
        assert await task == "done"
        gone = weakref.ref(task)
        del task
        await asyncio.sleep(0)  # the loop's handle that woke this task up is let go
        assert gone() is None
    finally:
        gc.enable()


def test_a_deadline_outside_a_task_is_refused(shared):
    async def outside() -> None:
        with Deadline(1, shared):
            pass

    coroutine = outside()
    with pytest.raises(RuntimeError):
        coroutine.send(None)  # no loop runs it, let alone a task
    coroutine.close()


async def test_deadlines_of_one_bound_share_one_timer(monkeypatch):
    armed = record_timers(monkeypatch)
    shared = Deadlines()
    with Deadline(60, shared), Deadline(60, shared), Deadline(60, shared):
        await asyncio.sleep(0)
    assert len(armed) == 1
    assert armed[0].cancelled()  # none left to bound: not left armed


async def test_a_shared_deadline_ends_at_its_own_time_after_the_one_before_left():
    shared = Deadlines()
    first = Deadline(0.02, shared)
    first.__enter__()  # the lane's timer: at its end

    async def second() -> None:
        with Deadline(0.02, shared):
            await asyncio.sleep(10)

    later = asyncio.create_task(second())
    await asyncio.sleep(0)  # it begins, behind the first
    first.__exit__(None, None, None)  # left in time: the timer fires for nothing then
    with pytest.raises(TimeoutError):
        await later
    assert running_task().cancelling() == 0


async def test_those_left_behind_a_live_one_are_swept_not_kept():
    shared = Deadlines()
    with Deadline(60, shared):  # the lane's head, live throughout
        for _ in range(500):
            with Deadline(60, shared):
                pass
        lane = shared.lanes[(asyncio.get_running_loop(), 60)]
        # At most twice the live ones and the slack (and the one that tipped it).
        assert len(lane._queue) <= 2 * 1 + lane.SLACK + 1


def test_lanes_of_a_closed_loop_are_let_go():
    shared = Deadlines()

    async def bounded() -> None:
        with Deadline(60, shared):
            await asyncio.sleep(0)

    asyncio.run(bounded())
    asyncio.run(bounded())
    assert len(shared.lanes) == 1
