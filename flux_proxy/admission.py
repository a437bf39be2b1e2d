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

Lanes by cost, not limits per client: what starves a gateway is heavy work, whoever sends
it; the image threads have the same two lanes (``imaging.ImageWorker``), so a small
request never waits behind a large one, neither to be admitted nor for a thread. A
client flooding one lane meets 503s there; fairness between clients of the same lane is
the ingress's to enforce (per-key rate limits), as it is for any other route.

The counts are this process's: with several workers, each admits its own share.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import TracebackType

from flux_proxy.config import LimitSettings
from flux_proxy.errors import InvalidRequest, Overloaded
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
    def __init__(self, name: str, capacity: int) -> None:
        self.name = name
        self.capacity = capacity
        self.admitted = 0  # pixels x n of the requests in this lane now


class Ticket:
    """One admitted request's place in its lane, given back once (by ``release`` or the
    ``with`` block's end) when the request is done."""

    def __init__(self, lane: Lane, cost: int) -> None:
        self._lane = lane
        self._cost = cost

    def release(self) -> None:
        self._lane.admitted -= self._cost
        self._cost = 0

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

    def admit(self, demand: Demand) -> Ticket:
        """A ticket for ``demand``, or the 400 (over budget) or 503 (lane full) refusing it."""
        self._check_budget(demand)
        lane = self._lane(demand)
        # Alone in its lane, a request within budget always gets in, whatever the settings.
        if lane.admitted and lane.admitted + demand.total > lane.capacity:
            raise Overloaded(
                f"The gateway is at capacity for {lane.name} image requests; "
                f"retry in {RETRY_AFTER[lane.name]} s.",
                retry_after=RETRY_AFTER[lane.name],
            )
        lane.admitted += demand.total
        return Ticket(lane, demand.total)

    def _lane(self, demand: Demand) -> Lane:
        light = demand.total <= self._limits.light_request_pixels
        return self._light if light and demand.fmt not in SLOW_ENCODERS else self._heavy

    def _check_budget(self, demand: Demand) -> None:
        limits = self._limits
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
