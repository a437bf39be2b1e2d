"""ImageStore: where images served at the gateway's own URLs are kept.

``put`` returns a name; the gateway links to ``{api}/images/files/{name}`` with a
signature (see ``signing.py``), unless the store has a direct link of its own (an S3
store's presigned URL). Names are random, so they cannot be guessed, and every backend
forgets images once they have expired. The backend is chosen by config
(``store.backend``): memory and directory here, S3 in ``s3_store.py``.
"""

from __future__ import annotations

import os
import re
import secrets
import sys
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import anyio

from flux_proxy.imaging import EXTENSIONS, MEDIA_TYPES
from flux_proxy.metrics import StoreUsage

_NAME = re.compile(r"^[A-Za-z0-9_-]{16,64}\.(png|jpg|gif|webp|avif)$")
MEDIA_TYPE_OF_EXTENSION = {ext: MEDIA_TYPES[fmt] for fmt, ext in EXTENSIONS.items()}
# What an OrderedDict spends on one key beyond the objects it holds (its hash-table
# slot and entry, its linked-list node, room to grow), rounded up: ~65-100 measured.
_ORDERED_DICT_ENTRY = 128


@dataclass(frozen=True, slots=True)
class StoredImage:
    data: bytes
    media_type: str


class ImageStore(Protocol):
    async def put(self, data: bytes, fmt: str) -> str: ...

    async def get(self, name: str) -> StoredImage | None: ...

    def direct_url(self, name: str) -> str | None:
        """A link that fetches ``name`` without the gateway, or None: link to the gateway."""
        ...

    def known_problem(self) -> str | None:
        """A problem the store met a moment ago, without asking again (no I/O), or None.
        A ``url`` request fails on it at once, before a provider is paid for an image
        the store could not keep."""
        ...

    async def problem(self) -> str | None:
        """Why the store cannot keep images now, or None. Readiness probes call this
        every few seconds, so it must be cheap; its words reach unauthenticated clients."""
        ...


@runtime_checkable
class MeasuredStore(Protocol):
    """A store that can tell how much it holds (for the store gauges of /metrics)."""

    async def usage(self) -> StoreUsage:
        """Called once a scrape: cheap, or run off the event loop."""
        ...


def new_name(fmt: str) -> str:
    return f"{secrets.token_urlsafe(24)}.{EXTENSIONS[fmt]}"


def is_valid_name(name: str) -> bool:
    return _NAME.fullmatch(name) is not None


class MemoryImageStore:
    """In-process store, bounded by bytes and age. One replica only."""

    def __init__(
        self, *, ttl_seconds: int, max_bytes: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._ttl = ttl_seconds
        self._max_bytes = max_bytes
        self._clock = clock
        self._items: OrderedDict[str, tuple[float, StoredImage]] = OrderedDict()
        self._bytes = 0

    async def put(self, data: bytes, fmt: str) -> str:
        name = new_name(fmt)
        item = (self._clock() + self._ttl, StoredImage(data, MEDIA_TYPES[fmt]))
        self._items[name] = item
        self._bytes += _cost(name, item)
        self._evict()
        return name

    async def get(self, name: str) -> StoredImage | None:
        item = self._items.get(name)
        if item is None or item[0] < self._clock():
            return None
        return item[1]

    def direct_url(self, name: str) -> str | None:
        return None

    def known_problem(self) -> str | None:
        return None

    async def problem(self) -> str | None:
        return None  # process memory is there as long as the process is

    async def usage(self) -> StoreUsage:
        self._evict()
        return StoreUsage(images=len(self._items), bytes=self._bytes)

    def _evict(self) -> None:
        now = self._clock()
        while self._items:
            name, item = next(iter(self._items.items()))
            if item[0] >= now and self._bytes <= self._max_bytes:
                break
            del self._items[name]
            self._bytes -= _cost(name, item)


def _cost(name: str, item: tuple[float, StoredImage]) -> int:
    """What one memory-store entry really holds: its bytes object, name, expiry, record
    and slot, not just ``len(data)`` (a thousand tiny images cost far more than that)."""
    expires, image = item
    held = (image.data, name, expires, image, item)
    return sum(map(sys.getsizeof, held)) + _ORDERED_DICT_ENTRY


class DirectoryImageStore:
    """Images as files in one directory; survives restarts, shareable over a volume."""

    SWEEP_EVERY = 100

    def __init__(
        self, directory: Path, *, ttl_seconds: int, clock: Callable[[], float] = time.time
    ) -> None:
        self._directory = directory
        self._ttl = ttl_seconds
        self._clock = clock
        self._puts = 0
        directory.mkdir(parents=True, exist_ok=True)

    async def put(self, data: bytes, fmt: str) -> str:
        name = new_name(fmt)
        path = anyio.Path(self._directory / name)
        partial = anyio.Path(self._directory / f".{name}.partial")
        await partial.write_bytes(data)
        await partial.rename(path)  # readers never see half a file
        self._puts += 1
        if self._puts % self.SWEEP_EVERY == 0:
            await anyio.to_thread.run_sync(self._sweep)
        return name

    async def get(self, name: str) -> StoredImage | None:
        if not is_valid_name(name):
            return None
        path = anyio.Path(self._directory / name)
        try:
            stat = await path.stat()
            if stat.st_mtime + self._ttl < self._clock():
                return None
            data = await path.read_bytes()
        except FileNotFoundError:
            return None
        return StoredImage(data, MEDIA_TYPE_OF_EXTENSION[name.rsplit(".", 1)[1]])

    def direct_url(self, name: str) -> str | None:
        return None

    def known_problem(self) -> str | None:
        return None  # a write tells, and costs what a check would

    async def problem(self) -> str | None:
        return await anyio.to_thread.run_sync(self._problem)

    async def usage(self) -> StoreUsage:
        return await anyio.to_thread.run_sync(self._usage)

    def _usage(self) -> StoreUsage:
        images = size = 0
        with os.scandir(self._directory) as entries:
            for entry in entries:
                if is_valid_name(entry.name):
                    try:
                        size += entry.stat().st_size
                    except FileNotFoundError:  # swept by another replica meanwhile
                        continue
                    images += 1
        return StoreUsage(images=images, bytes=size)

    def _problem(self) -> str | None:
        # Not the path itself: the answer goes to whoever asks /readyz.
        if not self._directory.is_dir():
            return "the image directory does not exist"
        if not os.access(self._directory, os.W_OK | os.X_OK):
            return "the image directory is not writable"
        return None

    def _sweep(self) -> None:
        cutoff = self._clock() - self._ttl
        for path in self._directory.iterdir():
            try:
                if path.is_file() and path.stat().st_mtime < cutoff:
                    path.unlink()
            except FileNotFoundError:
                continue
