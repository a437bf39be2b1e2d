"""Admission control: which image requests the gateway takes on now, and which it refuses.

A request's cost is what it asks the gateway to make: ``n`` images of its target size,
in pixels (``Demand``). Two checks run before anything is spent, upstream or in a thread:

- the request's own budget: pixels x n at most ``limits.max_request_pixels``, and at most
  ``limits.max_avif_pixels`` when the answer is AVIF (its encoder is the slow one). Above
  either, a 400: no wait would make that request cheaper.
- its lane's capacity. Requests are light (pixels x n at most
  ``limits.light_request_pixels``, in a fast format) or heavy, and each lane admits a
  bounded number of pixels at once (``limits.light_lane_pixels``,
  ``limits.heavy_lane_pixels``), working or waiting. Past that a fast 503 with
  ``Retry-After``, instead of a queue every client waits in until it times out.

Lanes by cost first: what starves a gateway is heavy work, whoever sends it; the image
threads have the same two lanes (``imaging.ImageWorker``), so a small request never
waits behind a large one, neither to be admitted nor for a thread. Then, when the
gateway has several client keys, one key holds at most ``limits.client_lane_share`` of a
lane: past it that key gets a 429 with ``Retry-After`` while the others still get in.
(Without keys there is no client identity worth the name: an address behind a proxy or
a NAT is many clients, or one pretending to be many.)

The counts are this process's: with several workers, each admits its own share.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import TracebackType

from flux_proxy.config import LimitSettings
from flux_proxy.errors import InvalidRequest, Overloaded, RateLimited
from flux_proxy.imaging import SLOW_ENCODERS

# Seconds a refused client is told to wait: about one light request's time, and a
# few seconds, a heavy request's share of its lane.
RETRY_AFTER = {"light": 1, "heavy": 5}


@dataclass(frozen=True, slots=True)
class Demand:
    """What one request asks the gateway to make: ``n`` images of ``pixels`` each, as ``fmt``."""

    pixels: int
    n: int
    fmt: str

    @property
    def total(self) -> int:
        return self.pixels * self.n


class Lane:
    """Requests of one kind (light or heavy) admitted now, in pixels x n: in all, and per key."""

    def __init__(self, name: str, capacity: int) -> None:
        self.name = name
        self.capacity = capacity
        self.admitted = 0  # pixels x n of the requests in this lane now
        # The same per client key (by its index), for the keys holding any now.
        self.by_client: dict[int, int] = {}

    def take(self, cost: int, client: int | None) -> None:
        self.admitted += cost
        if client is not None:
            self.by_client[client] = self.by_client.get(client, 0) + cost

    def give_back(self, cost: int, client: int | None) -> None:
        self.admitted -= cost
        if client is not None:
            left = self.by_client.pop(client) - cost
            if left:
                self.by_client[client] = left


class Ticket:
    """One admitted request's place in its lane, given back once (by ``release`` or the
    ``with`` block's end) when the request is done."""

    def __init__(self, lane: Lane, cost: int, client: int | None) -> None:
        self._lane = lane
        self._cost = cost
        self._client = client
        self._held = True

    def release(self) -> None:
        if self._held:
            self._held = False
            self._lane.give_back(self._cost, self._client)

    def __enter__(self) -> Ticket:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.release()


class Admission:
    def __init__(self, limits: LimitSettings) -> None:
        self._limits = limits
        self._light = Lane("light", limits.light_lane_pixels)
        self._heavy = Lane("heavy", limits.heavy_lane_pixels)

    def admit(self, demand: Demand, client: int | None = None) -> Ticket:
        """A ticket for ``demand`` (sent with client key number ``client``, None when keys
        are not shared), or the 400 (over budget), 429 (the key's share of its lane in
        use) or 503 (lane full) refusing it."""
        self._check_budget(demand)
        lane = self._lane(demand)
        cost = demand.total
        retry_after = RETRY_AFTER[lane.name]
        held = lane.by_client.get(client, 0) if client is not None else 0
        # A key holding nothing yet always gets its turn (the lane permitting).
        if held and held + cost > lane.capacity * self._limits.client_lane_share:
            raise RateLimited(
                f"This API key has its share of the gateway's {lane.name} image capacity "
                f"in use; retry in {retry_after} s.",
                headers={"Retry-After": str(retry_after)},
            )
        # Alone in its lane, a request within budget always gets in, whatever the settings.
        if lane.admitted and lane.admitted + cost > lane.capacity:
            raise Overloaded(
                f"The gateway is at capacity for {lane.name} image requests; "
                f"retry in {retry_after} s.",
                retry_after=retry_after,
            )
        lane.take(cost, client)
        return Ticket(lane, cost, client)

    def _lane(self, demand: Demand) -> Lane:
        light = demand.total <= self._limits.light_request_pixels
        return self._light if light and demand.fmt not in SLOW_ENCODERS else self._heavy

    def _check_budget(self, demand: Demand) -> None:
        limits = self._limits
        if demand.total <= limits.max_request_pixels and (
            demand.fmt not in SLOW_ENCODERS or demand.total <= limits.max_avif_pixels
        ):
            return  # within budget (every request but a refused one): no message to word
        what = f"{demand.n} image{'s' if demand.n > 1 else ''} of {demand.pixels} pixels"
        if demand.total > limits.max_request_pixels:
            raise InvalidRequest(
                f"This request asks for {what} ({demand.total} in all); this gateway makes "
                f"at most {limits.max_request_pixels} pixels per request. Ask for fewer or "
                "smaller images.",
                param="n" if demand.n > 1 else "size",
                code="too_many_pixels",
            )
        if demand.fmt in SLOW_ENCODERS and demand.total > limits.max_avif_pixels:
            raise InvalidRequest(
                f"This request asks for {what} as {demand.fmt} ({demand.total} in all); "
                f"{demand.fmt} encodes slowly, and this gateway makes at most "
                f"{limits.max_avif_pixels} pixels of it per request. Ask for fewer or "
                "smaller images, or another output_format.",
                param="output_format",
                code="too_many_pixels",
            )
