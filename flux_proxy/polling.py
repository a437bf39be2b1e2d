"""Helpers for providers that submit a task and poll for it.

Polls wait what the provider suggests (``Retry-After``) or back off from a short
first interval; the waits are ``anyio.sleep``, never blocking. The overall
deadline is the request's own (``limits.request_timeout``). When the request is
cancelled (the client went away, or the deadline passed) ``cancel_upstream_on_exit``
tells the provider to stop the task where the provider allows it.
"""

from __future__ import annotations

import email.utils
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager

import anyio
from pydantic import Field

from flux_proxy.errors import GatewayError, UpstreamTimeout
from flux_proxy.providers.base import ProviderOptions

logger = logging.getLogger("flux_proxy")


class Backoff:
    """Delays between polls: the provider's hint when it gives one, else growing."""

    def __init__(
        self,
        initial: float = 0.5,
        maximum: float = 5.0,
        factor: float = 1.5,
        minimum: float = 0.1,
    ) -> None:
        self._next = initial
        self._maximum = maximum
        self._factor = factor
        # A repeated "Retry-After: 0" must not turn polling into a busy loop.
        self._minimum = minimum

    def delay(self, retry_after: str | None = None) -> float:
        hinted = retry_after_seconds(retry_after)
        if hinted is not None:
            return min(max(hinted, self._minimum), self._maximum)
        delay = self._next
        self._next = min(self._next * self._factor, self._maximum)
        return delay

    async def wait(self, retry_after: str | None = None) -> None:
        await anyio.sleep(self.delay(retry_after))


class PollingOptions(ProviderOptions):
    """The poll options every polling provider offers; subclass to add its own."""

    # First wait between polls when the provider suggests none; later waits grow.
    poll_interval: float = Field(0.5, gt=0)
    poll_max_interval: float = Field(5.0, gt=0)
    # Give up polling after this long (504); unset: only the request's own deadline.
    poll_timeout: float | None = Field(None, gt=0)

    @contextmanager
    def deadline(self, task: str) -> Iterator[None]:
        """Bound the block by ``poll_timeout``; past it, a 504 naming ``task``."""
        try:
            with anyio.fail_after(self.poll_timeout):
                yield
        except TimeoutError:
            raise UpstreamTimeout(
                f"The {task} was not done after {self.poll_timeout:g} seconds of polling "
                "(the model's poll_timeout option)."
            ) from None

    def backoff(self) -> Backoff:
        return Backoff(
            initial=self.poll_interval,
            maximum=max(self.poll_interval, self.poll_max_interval),
        )


def retry_after_seconds(value: str | None) -> float | None:
    """``Retry-After`` as seconds: either a number or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


@asynccontextmanager
async def cancel_upstream_on_exit(
    cancel: Callable[[], Awaitable[None]], *, on_error: bool = False, grace: float = 5.0
) -> AsyncIterator[None]:
    """Run ``cancel()`` if the block is cancelled (or, with ``on_error``, fails with a
    GatewayError: the gateway gives the task up, so stop paying for it), shielded and
    bounded by ``grace`` seconds."""
    stopping: tuple[type[BaseException], ...] = (anyio.get_cancelled_exc_class(),)
    if on_error:
        stopping += (GatewayError,)
    try:
        yield
    except stopping:
        with anyio.CancelScope(shield=True), anyio.move_on_after(grace):
            try:
                await cancel()
            except Exception:  # best effort: the request is gone either way
                logger.warning("cancelling the upstream task failed", exc_info=True)
        raise
