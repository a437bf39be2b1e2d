"""An OpenAI Images upstream that fails on purpose: 500s, 429s, connection resets, slowness.

It is a raw asyncio HTTP/1.1 server (keep-alive, Content-Length bodies), not an ASGI
app, because a reset must be a real one: the socket is closed with ``SO_LINGER`` 0, so
the gateway's connection gets a TCP RST where its answer should be. Every answer that
is not a fault is ``n`` copies of one pre-encoded PNG as ``b64_json``.

``FaultPlan.rate`` of the requests get a fault, its kind drawn evenly from ``kinds``,
from a seeded generator so a run is repeatable. ``GET /health`` answers ``ok`` and
``GET /stats`` the requests served so far, by outcome (JSON).

    python -m tests.faulty_upstream --port N --rate 0.05 --seed 1 [--parent PID]

serves until stopped (or until ``--parent`` exits); ``serve_in_thread`` serves in the
test process.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import random
import socket
import struct
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from PIL import Image

FAULTS = ("500", "429", "reset", "slow")
# Not in the default mix: an answer whose connection closes before its promised length.
CUT = "cut"
MAX_HEAD = 64 * 1024


@dataclass(frozen=True, slots=True)
class FaultPlan:
    rate: float = 0.0  # share of generation requests that get a fault
    kinds: tuple[str, ...] = FAULTS
    slow_seconds: float = 1.0  # a "slow" answer is a good one, this much later
    seed: int = 0
    side: int = 64  # the PNG's width and height


def png(side: int) -> bytes:
    buffer = io.BytesIO()
    Image.linear_gradient("L").resize((side, side)).convert("RGB").save(buffer, "PNG")
    return buffer.getvalue()


@dataclass
class FaultyUpstream:
    plan: FaultPlan = field(default_factory=FaultPlan)
    served: Counter[str] = field(default_factory=Counter)  # "ok" or the fault, per request

    def __post_init__(self) -> None:
        self._random = random.Random(self.plan.seed)
        self._b64 = base64.b64encode(png(self.plan.side)).decode()

    def pick(self) -> str:
        if self._random.random() >= self.plan.rate:
            return "ok"
        return self.plan.kinds[self._random.randrange(len(self.plan.kinds))]

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while await self._one(reader, writer):
                pass
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()

    async def _one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        head = await reader.readuntil(b"\r\n\r\n")
        if len(head) > MAX_HEAD:
            return False
        request_line, *lines = head.decode("latin-1").split("\r\n")
        method, path, _ = request_line.split(" ", 2)
        headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in lines)}
        body = await reader.readexactly(int(headers.get("content-length") or 0))
        if method == "GET" and path in ("/health", "/stats"):
            answer = b"ok" if path == "/health" else json.dumps(self.served).encode()
            writer.write(
                _answer(200, answer, "text/plain" if path == "/health" else "application/json")
            )
            await writer.drain()
            return True
        if method != "POST" or not path.endswith("/images/generations"):
            writer.write(_answer(404, b'{"error": {"message": "no such route"}}'))
            await writer.drain()
            return True
        fault = self.pick()
        self.served[fault] += 1
        if fault == "reset":
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
            return False
        if fault == CUT:
            answer = _answer(200, self._images(body))
            writer.write(answer.replace(b"Content-Length: ", b"Content-Length: 1000", 1))
            await writer.drain()
            return False
        if fault == "slow":
            await asyncio.sleep(self.plan.slow_seconds)
        if fault == "500":
            writer.write(_answer(500, b'{"error": {"message": "injected failure"}}'))
        elif fault == "429":
            payload = b'{"error": {"message": "injected rate limit"}}'
            writer.write(_answer(429, payload, extra=b"Retry-After: 1\r\n"))
        else:
            writer.write(_answer(200, self._images(body)))
        await writer.drain()
        return headers.get("connection", "").lower() != "close"

    def _images(self, body: bytes) -> bytes:
        try:
            n = int(json.loads(body).get("n", 1))
        except (ValueError, AttributeError, TypeError):
            n = 1
        data = [{"b64_json": self._b64} for _ in range(max(1, min(n, 10)))]
        return json.dumps({"created": 1, "data": data}).encode()


def _answer(status: int, body: bytes, media: str = "application/json", extra: bytes = b"") -> bytes:
    reason = {200: "OK", 404: "Not Found", 429: "Too Many Requests", 500: "Server Error"}
    head = (
        f"HTTP/1.1 {status} {reason[status]}\r\nContent-Type: {media}\r\n"
        f"Content-Length: {len(body)}\r\n"
    ).encode()
    return head + extra + b"\r\n" + body


@contextmanager
def serve_in_thread(upstream: FaultyUpstream) -> Iterator[str]:
    """Serve ``upstream`` on a free loopback port from a thread; yields its base URL."""
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    port: list[int] = []
    stop = asyncio.Event()

    async def main() -> None:
        server = await asyncio.start_server(upstream.handle, "127.0.0.1", 0, limit=MAX_HEAD)
        port.append(server.sockets[0].getsockname()[1])
        ready.set()
        async with server:
            await stop.wait()
            server.close()
            # The connections' handlers (idle keep-alive ones included) end with the loop.
            handlers = asyncio.all_tasks() - {asyncio.current_task()}
            for task in handlers:
                task.cancel()
            await asyncio.gather(*handlers, return_exceptions=True)

    thread = threading.Thread(target=loop.run_until_complete, args=(main(),), daemon=True)
    thread.start()
    ready.wait(10)
    try:
        yield f"http://127.0.0.1:{port[0]}"
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(10)
        loop.close()


async def _serve(upstream: FaultyUpstream, port: int, parent: int | None) -> None:
    server = await asyncio.start_server(upstream.handle, "127.0.0.1", port, limit=MAX_HEAD)
    async with server:
        while parent is None or _alive(parent):  # noqa: ASYNC110 - polls another process
            await asyncio.sleep(1)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--rate", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--slow-seconds", type=float, default=1.0)
    parser.add_argument("--parent", type=int, default=None, help="exit when this PID is gone")
    args = parser.parse_args(argv)
    plan = FaultPlan(rate=args.rate, seed=args.seed, slow_seconds=args.slow_seconds)
    asyncio.run(_serve(FaultyUpstream(plan), args.port, args.parent))


if __name__ == "__main__":
    main()
