"""The budget for upstream answers being read: reads in turn, none lost, none stuck."""

from __future__ import annotations

import asyncio
import base64
import io
import os

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


async def test_reads_past_the_budget_wait_and_go_in_turn() -> None:
    budget = ReadBudget(100)
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
