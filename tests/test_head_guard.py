"""The head guard's one timer per connection, on a clock the test moves: a keep-alive
connection's every wait gets its full time, and an idle one is still cut at its deadline.
(Over real sockets: tests/test_client_timeouts.py.)"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, cast

from flux_proxy.head_guard import _HeadGuard


class Handle:
    def __init__(self, when: float, callback: Callable[..., object], args: tuple[Any, ...]):
        self.when, self.callback, self.args = when, callback, args
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class Clock:
    """The part of an event loop the guard uses, with time moved by hand."""

    def __init__(self) -> None:
        self.now = 0.0
        self.timers: list[Handle] = []

    def time(self) -> float:
        return self.now

    def call_at(self, when: float, callback: Callable[..., object], *args: Any) -> Handle:
        handle = Handle(when, callback, args)
        self.timers.append(handle)
        return handle

    def advance(self, seconds: float) -> None:
        self.now += seconds
        while due := [t for t in self.timers if t.when <= self.now and not t.cancelled]:
            handle = min(due, key=lambda t: t.when)
            self.timers.remove(handle)
            handle.callback(*handle.args)

    def pending(self) -> int:
        return sum(not t.cancelled for t in self.timers)


class Transport:
    def __init__(self) -> None:
        self.written = b""
        self.closed = False

    def write(self, data: bytes) -> None:
        self.written += data

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed


def guarded(seconds: float = 1.0) -> tuple[_HeadGuard, Clock, asyncio.Transport, Transport]:
    clock = Clock()
    transport = Transport()
    guard = _HeadGuard(cast("asyncio.AbstractEventLoop", clock), seconds, 1000)
    return guard, clock, cast("asyncio.Transport", transport), transport


def test_each_wait_on_a_keep_alive_connection_gets_its_full_time():
    guard, clock, transport, seen = guarded(1.0)
    guard.awaiting(transport)  # the connection opens
    for _ in range(5):  # a request every 0.6 s: each head within a second of the last answer
        clock.advance(0.6)
        guard.fits(transport, 100)
        guard.arrived()
        guard.awaiting(transport)  # its answer sent
        assert not seen.closed
    assert clock.pending() == 1  # one timer, following the deadline
    clock.advance(0.99)
    assert not seen.closed
    clock.advance(0.02)
    assert seen.closed and seen.written == b""  # idle: closed without a word


def test_half_a_head_at_the_deadline_gets_a_408():
    guard, clock, transport, seen = guarded(1.0)
    guard.awaiting(transport)
    clock.advance(0.5)
    guard.arrived()
    guard.awaiting(transport)
    clock.advance(0.5)
    guard.fits(transport, 10)  # part of the next head
    clock.advance(0.49)
    assert not seen.closed
    clock.advance(0.02)
    assert seen.closed and seen.written.startswith(b"HTTP/1.1 408 ")


def test_a_request_being_answered_is_never_cut():
    guard, clock, transport, seen = guarded(1.0)
    guard.awaiting(transport)
    guard.fits(transport, 100)
    guard.arrived()  # the head came: the app takes its time
    clock.advance(10)
    assert not seen.closed
    assert clock.pending() == 0


def test_a_closed_connection_leaves_no_timer():
    guard, clock, transport, seen = guarded(1.0)
    guard.awaiting(transport)
    guard.closed()
    clock.advance(10)
    assert not seen.closed and clock.pending() == 0
