"""unless_disconnected: a disconnect cancels the work and nothing else; other cancels stand."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

import pytest
from starlette.types import Message, Receive, Scope, Send

from flux_proxy.disconnect import unless_disconnected
from tests.upstream_openai import gateway_config


class Client:
    """An ASGI ``receive`` whose client leaves when told to."""

    def __init__(self) -> None:
        self._gone = asyncio.Event()

    def leave(self) -> None:
        self._gone.set()

    async def receive(self) -> Message:
        await self._gone.wait()
        return {"type": "http.disconnect"}


def _waits_after(started: asyncio.Event) -> Callable[[], Awaitable[None]]:
    """Work that says it has started, then waits until it is cancelled."""

    async def work() -> None:
        started.set()
        await asyncio.sleep(10)

    return work


@pytest.mark.anyio
async def test_the_work_s_result_when_the_client_stays():
    client = Client()

    async def work() -> str:
        await asyncio.sleep(0)
        return "done"

    assert await unless_disconnected(client.receive, work) == "done"


@pytest.mark.anyio
async def test_a_disconnect_cancels_the_work_and_leaves_the_task_usable():
    client = Client()
    stopped: list[str] = []

    async def work() -> str:
        try:
            client.leave()
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            stopped.append("cancelled")
            raise
        return "never"

    assert await unless_disconnected(client.receive, work) is None
    assert stopped == ["cancelled"]
    task = asyncio.current_task()
    assert task is not None and task.cancelling() == 0
    await asyncio.sleep(0)  # no cancel left pending on the caller


@pytest.mark.anyio
async def test_another_cancel_goes_through_even_with_a_disconnect():
    client = Client()
    started = asyncio.Event()
    work = _waits_after(started)

    async def serve() -> None:
        await unless_disconnected(client.receive, work)

    serving = asyncio.create_task(serve())
    await started.wait()
    client.leave()
    await asyncio.sleep(0)  # the watcher has seen it, and cancelled the work
    serving.cancel("shutdown")
    with pytest.raises(asyncio.CancelledError):
        await serving
    assert serving.cancelled()


@pytest.mark.anyio
async def test_a_cancel_without_a_disconnect_goes_through():
    client = Client()
    started = asyncio.Event()
    work = _waits_after(started)

    serving = asyncio.create_task(unless_disconnected(client.receive, work))
    await started.wait()
    serving.cancel()
    with pytest.raises(asyncio.CancelledError):
        await serving


class HangingUpstream:
    """Takes an image request and answers nothing; notes when its caller goes away."""

    def __init__(self) -> None:
        self.asked = threading.Event()
        self.left = threading.Event()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        while (await receive()).get("more_body"):
            pass
        self.asked.set()
        while (await receive())["type"] != "http.disconnect":
            pass
        self.left.set()


def test_a_client_that_leaves_a_real_gateway_stops_its_upstream_call(serve_upstream, start_gateway):
    upstream = HangingUpstream()
    gateway = start_gateway(gateway_config(serve_upstream(upstream), "url"))
    address = urlsplit(gateway)
    body = json.dumps({"model": "up", "prompt": "x", "size": "8x8"}).encode()
    head = (
        f"POST /v1/images/generations HTTP/1.1\r\nHost: {address.netloc}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    with socket.create_connection((address.hostname, address.port)) as client:
        client.sendall(head + body)
        assert upstream.asked.wait(10), "the upstream never got the call"
    # The gateway saw its client leave and cancelled the call: the upstream's line closed.
    assert upstream.left.wait(10)
