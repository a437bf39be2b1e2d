"""The budget for upstream answers being read: reads in turn, none lost, none stuck."""

from __future__ import annotations

import asyncio
import base64
import io
import os
from typing import Any

import httpx
import pytest
from PIL import Image

from flux_proxy import FluxProxy
from flux_proxy.read_budget import UNKNOWN_LENGTH_START, ReadBudget, Reservation
from tests.asgi import asgi_client

pytestmark = pytest.mark.anyio


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def waiting(budget: ReadBudget, size: int | None) -> asyncio.Task[Reservation]:
    return asyncio.ensure_future(budget.reserve(size))


@pytest.mark.parametrize(
    "limits",
    [
        {"max_bytes": 100},  # the memory budget
        # Memory allows all three; the share of fresh reads does not (never stale here).
        {"max_bytes": 1000, "fresh_bytes": 100, "stall": 3600},
    ],
    ids=["memory", "fresh share"],
)
async def test_reads_past_a_limit_wait_and_go_in_turn(limits: dict[str, Any]) -> None:
    budget = ReadBudget(**limits)
    first = await budget.reserve(60)
    second, third = waiting(budget, 50), waiting(budget, 10)
    await settle()
    # The third would fit, but waits behind the second: first come, first served.
    assert not second.done() and not third.done() and budget.held == 60
    first.release()
    await settle()
    assert second.done() and third.done() and budget.held == 60
    second.result().release()
    third.result().release()
    assert budget.held == 0


async def test_an_answer_larger_than_the_budget_is_read_alone() -> None:
    budget = ReadBudget(100)
    small = await budget.reserve(1)
    large = waiting(budget, 10_000)
    await settle()
    assert not large.done()
    small.release()
    await settle()
    assert large.done() and budget.held == 100  # the whole budget, no more
    large.result().release()
    assert budget.held == 0


async def test_a_read_given_up_while_waiting_holds_no_one_up() -> None:
    budget = ReadBudget(100)
    first = await budget.reserve(100)
    given_up, behind = waiting(budget, 100), waiting(budget, 30)
    await settle()
    given_up.cancel()
    await settle()
    first.release()
    await settle()
    assert given_up.cancelled() and behind.done() and budget.held == 30
    behind.result().release()
    assert budget.held == 0


async def test_a_read_of_unknown_length_counts_what_it_reads_without_waiting() -> None:
    budget = ReadBudget(UNKNOWN_LENGTH_START * 2)
    unknown = await budget.reserve(None)
    assert budget.held == UNKNOWN_LENGTH_START
    unknown.grow(UNKNOWN_LENGTH_START * 3)  # past the budget: a started read finishes
    later = waiting(budget, 1)
    await settle()
    assert not later.done()
    unknown.release()
    await settle()
    assert later.done() and budget.held == 1


async def test_a_stalled_read_lets_the_next_begin_before_it_ends() -> None:
    budget = ReadBudget(1000, fresh_bytes=100, stall=0.01)
    slow = await budget.reserve(100)
    next_one = waiting(budget, 100)
    await settle()
    assert not next_one.done()
    # The first read is still going (waiting on its network): once stale, the next begins.
    following = await asyncio.wait_for(next_one, timeout=10)
    assert budget.held == 200
    slow.release()
    following.release()
    assert budget.held == 0


def test_a_budget_served_by_a_second_loop_still_watches_for_stalls() -> None:
    budget = ReadBudget(1000, fresh_bytes=100, stall=0.01)

    async def stalled_while_one_waits(leave_waiting: bool) -> None:
        # On the second loop the first loop's read, never ended, holds the fresh share
        # until it goes stale: only a timer on this loop lets this one begin.
        slow = await asyncio.wait_for(budget.reserve(100), timeout=10)
        following = waiting(budget, 100)
        await settle()  # the stall timer is armed on this loop
        if leave_waiting:
            following.cancel()
            return  # the loop ends with its timer pending and the first read held
        (await asyncio.wait_for(following, timeout=10)).release()
        slow.release()

    asyncio.run(stalled_while_one_waits(leave_waiting=True))
    asyncio.run(stalled_while_one_waits(leave_waiting=False))


async def test_empty_answers_leave_nothing_behind() -> None:
    budget = ReadBudget(1000, fresh_bytes=100, stall=3600)
    for _ in range(3):  # Content-Length: 0 (a 204, an empty 429)
        (await budget.reserve(0)).release()
    large = waiting(budget, 500)  # nothing is being read: it begins at once
    await settle()
    assert large.done() and budget.held == 500
    large.result().release()


async def test_a_read_larger_than_the_fresh_share_begins_alone() -> None:
    budget = ReadBudget(1000, fresh_bytes=100, stall=3600)
    large = await budget.reserve(500)  # nothing fresh: it begins at once
    small = waiting(budget, 1)
    await settle()
    assert not small.done()
    large.release()
    await settle()
    assert small.done() and budget.held == 1
    small.result().release()


def noise_png(side: int) -> bytes:
    buffer = io.BytesIO()
    Image.frombytes("RGB", (side, side), os.urandom(side * side * 3)).save(buffer, "PNG")
    return buffer.getvalue()


async def test_concurrent_requests_all_answer_through_a_budget_smaller_than_one_answer() -> None:
    image = noise_png(256)  # ~200 KB, over the smallest budget
    text = base64.b64encode(image).decode()
    transport = httpx.MockTransport(
        lambda request: httpx.Response(200, json={"data": [{"b64_json": text}]})
    )
    entry = {"provider": "openai", "base_url": "http://upstream.test/v1"}
    settings = {"limits": {"upstream_read_bytes": 64 * 1024}, "models": {"m": entry}}
    app = FluxProxy(settings, environ={}, transport=transport)
    body = {"model": "m", "prompt": "x", "size": "256x256", "response_format": "b64_json"}
    async with asgi_client(app) as client:
        answers = await asyncio.gather(
            *(client.post("/v1/images/generations", json=body) for _ in range(6))
        )
    for answer in answers:
        assert answer.status_code == 200, answer.text
        decoded = Image.open(io.BytesIO(base64.b64decode(answer.json()["data"][0]["b64_json"])))
        assert (decoded.format, decoded.size) == ("PNG", (256, 256))
