"""How many bytes of upstream answers the gateway reads into memory at once.

An image answer is read whole before the client gets anything: its last bytes say
whether the image is complete, and a truncated one must be a 502, not a 200. Read
as they arrive, every answer in flight is in memory at once, part read: measured on
``flux-proxy serve`` with 64 concurrent 1 MP b64_json requests against a fast
upstream, up to 53 answers were being read together, 57 MiB of them, most of the
process's peak above idle. An answer that waits its turn costs only what its
connection has buffered (the rest stays in the kernel's socket buffer, and the
upstream is slowed by TCP itself), so reading a few at a time bounds the memory
without costing throughput where the CPU is the limit anyway.

Each read reserves its answer's Content-Length before its body is read, and gives it
back when done; past the budget, reads wait in turn, first come, first served. An
answer larger than the whole budget is read alone. One of unknown length (chunked,
compressed) reserves a chunk to start and counts what it reads as it goes, never
waiting again once started, so no two reads can wait for each other. The wait lies
within the exchange's deadline (``limits.upstream_timeout``).

Reads also go in turn where memory does not ask it: at most ``FRESH_BYTES`` of
answers begun in the last ``STALL_SECONDS`` are read together. Answers read together
on one busy core share it, so they all finish late, together; read in turn, the first
finishes first and its request goes on. The n images of a fan-out arrive together and
are read one after another, not interleaved with every other request's: measured on
``flux-proxy serve`` with 16 concurrent n=4 requests of 1 MP b64_json against an
upstream that renders for 200 ms, the median went from 1.6x one image's to 1.2x (six
alternating runs, other work on the machine: load 2.5; 1.4x to 1.1x when quiet). A
read still going after ``STALL_SECONDS`` is waiting on the network, not the CPU (a 1 MP
answer on loopback is read in about a millisecond), so it stops counting and the next
one begins: a slow upstream's answers still arrive side by side.
"""

from __future__ import annotations

import asyncio
from collections import deque

# What a read of unknown length reserves to start.
UNKNOWN_LENGTH_START = 64 * 1024
# Bytes of answers read together while their reads are fresh: about one 1 MP image's
# base64 (a 4 MP one, more, is read alone; small ones a few at a time).
FRESH_BYTES = 2 * 1024 * 1024
# How long a read is fresh: past it, it waits on the network and lets the next begin.
STALL_SECONDS = 0.005


class Reservation:
    """The bytes one read holds of its budget, until :meth:`release`.

    Released in a ``finally``, not by ``async with``: an exception leaving an ``async
    with`` block (an answer over the cap) was seen to keep the frame that read it,
    megabytes, in a reference cycle until the collector ran."""

    __slots__ = ("_budget", "begun", "fresh", "size")

    def __init__(self, budget: ReadBudget, size: int, begun: float) -> None:
        self._budget = budget
        self.size = size
        self.fresh = size  # what it counts against the fresh reads' share, until stale
        self.begun = begun

    def grow(self, size: int) -> None:
        """Count ``size`` more bytes read, without waiting (a read once started finishes)."""
        self.size += size
        self._budget._held += size

    def release(self) -> None:
        self._budget._give_back(self)
        self.size = 0


class ReadBudget:
    """At most ``max_bytes`` of upstream answers being read at once, and of those at
    most ``fresh_bytes`` begun in the last ``stall`` seconds (see the module)."""

    def __init__(
        self, max_bytes: int, *, fresh_bytes: int = FRESH_BYTES, stall: float = STALL_SECONDS
    ) -> None:
        self.max_bytes = max_bytes
        self.fresh_bytes = fresh_bytes
        self.stall = stall
        self._held = 0
        self._fresh_held = 0
        self._fresh: deque[Reservation] = deque()  # in the order they began
        self._waiting: deque[tuple[int, asyncio.Future[Reservation]]] = deque()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_loop: asyncio.AbstractEventLoop | None = None

    @property
    def held(self) -> int:
        return self._held

    async def reserve(self, size: int | None) -> Reservation:
        """``size`` bytes (None: unknown, see the module), once it is this read's turn."""
        wanted = min(UNKNOWN_LENGTH_START if size is None else size, self.max_bytes)
        if not self._waiting and self._fits(wanted):
            return self._begin(wanted)
        future: asyncio.Future[Reservation] = asyncio.get_running_loop().create_future()
        entry = (wanted, future)
        self._waiting.append(entry)
        self._grant()  # ahead of it there may be only reads already cancelled
        try:
            return await future
        except BaseException:  # cancelled: a deadline, a client gone
            if future.done() and not future.cancelled():
                future.result().release()  # granted just as it was cancelled
            else:
                if entry in self._waiting:
                    self._waiting.remove(entry)
                self._grant()  # those behind it may fit now
            raise

    def _fits(self, size: int) -> bool:
        if self._held + size > self.max_bytes:
            return False
        # Alone, any read may begin: one larger than the share is read by itself.
        return not self._fresh or self._fresh_held + size <= self.fresh_bytes

    def _begin(self, size: int) -> Reservation:
        held = Reservation(self, size, asyncio.get_running_loop().time())
        self._held += size
        if size:  # an empty answer (Content-Length: 0) holds no share, so is not listed
            self._fresh_held += size
            self._fresh.append(held)
        return held

    def _give_back(self, held: Reservation) -> None:
        self._held -= held.size
        if held.fresh:
            self._fresh_held -= held.fresh
            held.fresh = 0
            self._fresh.remove(held)  # one of a few, most often the first
        self._grant()

    def _grant(self) -> None:
        while self._waiting:
            size, future = self._waiting[0]
            if future.cancelled():
                self._waiting.popleft()
                continue
            if not self._fits(size):
                self._watch_for_stalls()
                return
            self._waiting.popleft()
            future.set_result(self._begin(size))

    def _watch_for_stalls(self) -> None:
        """While reads wait on fresh ones, look again when the oldest goes stale: one
        timer for the budget, only while something waits."""
        loop = asyncio.get_running_loop()
        # A timer of a loop that has closed (an app served by one loop, then another)
        # never fires: not one to wait for.
        if not self._fresh or (self._timer is not None and self._timer_loop is loop):
            return
        self._timer_loop = loop
        self._timer = loop.call_at(self._fresh[0].begun + self.stall, self._stale)

    def _stale(self) -> None:
        self._timer = None
        deadline = asyncio.get_running_loop().time() - self.stall
        while self._fresh and self._fresh[0].begun <= deadline:
            stale = self._fresh.popleft()
            self._fresh_held -= stale.fresh
            stale.fresh = 0
        self._grant()
