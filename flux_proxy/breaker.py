"""Per-upstream circuit breakers: an upstream that keeps failing is skipped, then probed.

Closed, every request may use the upstream. ``failure_threshold`` retryable failures in a
row (a success resets the count), all within ``window_seconds``, open the circuit: for
``cooldown_seconds`` the upstream is skipped without being called, so failover goes
straight to the model's next provider (or, with none left, the client gets a fast 503).
After the cool-down the circuit is half-open: the next request is let through as the one
trial, and every other request skips the upstream while it runs. The trial's success
closes the circuit; its failure opens it for another cool-down; a trial that ends with
neither (the client left, the input was refused) hands the trial to the next request.

One board per gateway, one breaker per upstream (provider, base URL, upstream model): two
gateways in one process share nothing, and the clock is injected, so tests need no sleep.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

from flux_proxy.config import BreakerSettings
from flux_proxy.schema import Target

logger = logging.getLogger("flux_proxy")

Clock = Callable[[], float]  # seconds, monotonic


class BreakerState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass(frozen=True, slots=True)
class UpstreamId:
    """What one breaker guards: a provider's upstream endpoint for one model."""

    provider: str
    base_url: str  # "" when the provider's own default
    upstream_model: str

    def __str__(self) -> str:
        where = f" at {self.base_url}" if self.base_url else ""
        return f"{self.provider} ({self.upstream_model}{where})"


class BreakerListener(Protocol):
    """Told of every change of state and every skip: where metrics hook in."""

    def state_changed(self, upstream: UpstreamId, state: BreakerState) -> None: ...

    def skipped(self, upstream: UpstreamId) -> None: ...


class SilentListener:
    def state_changed(self, upstream: UpstreamId, state: BreakerState) -> None:
        del upstream, state

    def skipped(self, upstream: UpstreamId) -> None:
        del upstream


@dataclass(frozen=True, slots=True)
class Ticket:
    """Leave to use the upstream once; ``trial`` when it is the half-open probe."""

    trial: bool


# Tickets hold nothing but their kind: the two are made once, not one per call.
_TRIAL = Ticket(trial=True)
_CALL = Ticket(trial=False)


class CircuitBreaker:
    def __init__(
        self,
        upstream: UpstreamId,
        settings: BreakerSettings,
        clock: Clock,
        listener: BreakerListener,
    ) -> None:
        self.upstream = upstream
        self._settings = settings
        self._clock = clock
        self._listener = listener
        self._state = BreakerState.CLOSED
        self._failures: deque[float] = deque()  # times of the failures in a row, in the window
        self._opened_at = 0.0
        self._trial_running = False
        self.last_failure = ""  # the code of the failure that opened it, for messages

    @property
    def state(self) -> BreakerState:
        return self._state

    def retry_in(self) -> float:
        """Seconds until an open circuit lets its next trial through (0 when not open)."""
        if self._state is not BreakerState.OPEN:
            return 0.0
        return max(0.0, self._opened_at + self._settings.cooldown_seconds - self._clock())

    def acquire(self) -> Ticket | None:
        """Leave to call the upstream now, or None: skip it. A ticket must be handed back
        through exactly one of succeeded, failed or released."""
        if self._state is BreakerState.OPEN:
            if self.retry_in() > 0:
                self._listener.skipped(self.upstream)
                return None
            self._set(BreakerState.HALF_OPEN)
        if self._state is BreakerState.HALF_OPEN:
            if self._trial_running:
                self._listener.skipped(self.upstream)
                return None
            self._trial_running = True
            logger.info("upstream %s: cool-down over, one trial request probes it", self.upstream)
            return _TRIAL
        return _CALL

    def succeeded(self, ticket: Ticket) -> None:
        if ticket.trial:
            self._trial_running = False
            self._failures.clear()
            self._set(BreakerState.CLOSED)
            logger.info("upstream %s answered its trial: circuit closed", self.upstream)
        elif self._state is BreakerState.CLOSED:
            self._failures.clear()

    def failed(self, ticket: Ticket, code: str) -> None:
        if not self._settings.enabled:
            return
        now = self._clock()
        if ticket.trial:
            self._trial_running = False
            self._open(now, code, "its trial failed")
            return
        if self._state is not BreakerState.CLOSED:
            return  # began before the circuit opened: nothing new to learn
        failures = self._failures
        failures.append(now)
        while failures[0] < now - self._settings.window_seconds:
            failures.popleft()
        if len(failures) >= self._settings.failure_threshold:
            self._open(now, code, f"{len(failures)} failures in a row")

    def released(self, ticket: Ticket) -> None:
        """The call ended telling nothing of the upstream's health."""
        if ticket.trial:
            self._trial_running = False

    def _open(self, now: float, code: str, why: str) -> None:
        self._failures.clear()
        self._opened_at = now
        self.last_failure = code
        self._set(BreakerState.OPEN)
        logger.warning(
            "upstream %s: circuit open (%s, last: %s); skipped for %g s, then probed",
            self.upstream,
            why,
            code,
            self._settings.cooldown_seconds,
        )

    def _set(self, state: BreakerState) -> None:
        if state is not self._state:
            self._state = state
            self._listener.state_changed(self.upstream, state)


class BreakerBoard:
    """The breakers of one gateway, made on first use."""

    def __init__(
        self,
        settings: BreakerSettings,
        clock: Clock = time.monotonic,
        listener: BreakerListener | None = None,
    ) -> None:
        self._settings = settings
        self._clock = clock
        self._listener = listener or SilentListener()
        # By UpstreamId's fields: looked up per call, without making an UpstreamId.
        self._breakers: dict[tuple[str, str, str], CircuitBreaker] = {}

    def for_target(self, target: Target) -> CircuitBreaker:
        key = (target.provider.name, target.config.base_url or "", target.upstream_model)
        breaker = self._breakers.get(key)
        if breaker is None:
            breaker = CircuitBreaker(UpstreamId(*key), self._settings, self._clock, self._listener)
            self._breakers[key] = breaker
        return breaker
