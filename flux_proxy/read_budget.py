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
"""

from __future__ import annotations

import asyncio
from collections import deque

# What a read of unknown length reserves to start.
UNKNOWN_LENGTH_START = 64 * 1024


class Reservation:
    """The bytes one read holds of its budget, until :meth:`release`.

    Released in a ``finally``, not by ``async with``: an exception leaving an ``async
    with`` block (an answer over the cap) was seen to keep the frame that read it,
    megabytes, in a reference cycle until the collector ran."""

    def __init__(self, budget: ReadBudget, size: int) -> None:
        self._budget = budget
        self.size = size

    def grow(self, size: int) -> None:
        """Count ``size`` more bytes read, without waiting (a read once started finishes)."""
        self.size += size
        self._budget._held += size

    def release(self) -> None:
        self._budget._give_back(self.size)
        self.size = 0


class ReadBudget:
    """At most ``max_bytes`` of upstream answers being read at once (see the module)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._held = 0
        self._waiting: deque[tuple[int, asyncio.Future[None]]] = deque()

    @property
    def held(self) -> int:
        return self._held

    async def reserve(self, size: int | None) -> Reservation:
        """``size`` bytes (None: unknown, see the module), once it is this read's turn."""
        wanted = min(UNKNOWN_LENGTH_START if size is None else size, self.max_bytes)
        await self._take(wanted)
        return Reservation(self, wanted)

    async def _take(self, size: int) -> None:
        if not self._waiting and self._held + size <= self.max_bytes:
            self._held += size
            return
        entry = (size, asyncio.get_running_loop().create_future())
        self._waiting.append(entry)
        self._grant()  # ahead of it there may be only reads already cancelled
        if entry[1].done():
            return
        try:
            await entry[1]
        except BaseException:  # cancelled: a deadline, a client gone
            if entry[1].done() and not entry[1].cancelled():
                self._give_back(size)  # granted just as it was cancelled
            else:
                if entry in self._waiting:
                    self._waiting.remove(entry)
                self._grant()  # those behind it may fit now
            raise

    def _give_back(self, size: int) -> None:
        self._held -= size
        self._grant()

    def _grant(self) -> None:
        while self._waiting:
            size, future = self._waiting[0]
            if future.cancelled():
                self._waiting.popleft()
                continue
            if self._held + size > self.max_bytes:
                return
            self._waiting.popleft()
            self._held += size
            future.set_result(None)
