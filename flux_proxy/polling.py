"""Submit, then poll: the one policy every polling provider follows (:func:`poll`).

- The URL polled is the one the provider handed back, followed as given; the key
  goes with it only to the provider's hosts (``Upstream.request``).
- Each wait is what the provider suggests (``Retry-After``, bounded by the
  ``poll_max_interval`` option, with a floor) or a backoff from ``poll_interval``;
  the waits are ``anyio.sleep``, never blocking.
- A poll answered 429, 502 or 503 is waited out and asked again, up to
  ``MAX_RETRIES`` in a row; any other failure is mapped to the client's error.
- ``poll_timeout`` bounds the polling (504); the request's own deadline
  (``limits.request_timeout``) bounds everything.
- When the gateway gives the task up (the client went away, a deadline passed,
  polling failed) the provider's ``cancel`` is called, where it has one.
"""

from __future__ import annotations

import email.utils
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from contextlib import AsyncExitStack, asynccontextmanager, contextmanager
from typing import TypeVar

import anyio
import httpx
from pydantic import Field, model_validator

from flux_proxy.errors import GatewayError, UpstreamTimeout
from flux_proxy.providers.base import ProviderOptions
from flux_proxy.upstream import Upstream

T = TypeVar("T")
# Poll answers worth waiting out rather than failing on (fal's own clients retry these;
# BFL and Replicate throttle polls with 429), and how many in a row before giving up.
RETRY_STATUSES = frozenset({429, 502, 503})
MAX_RETRIES = 5

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

    @model_validator(mode="after")
    def _interval_order(self) -> PollingOptions:
        if self.poll_interval > self.poll_max_interval:
            raise ValueError("poll_interval must not exceed poll_max_interval")
        return self

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
        return Backoff(initial=self.poll_interval, maximum=self.poll_max_interval)


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


async def poll(
    upstream: Upstream,
    url: str,
    read: Callable[[httpx.Response], Awaitable[T | None]],
    *,
    options: PollingOptions,
    task: str,
    cancel: Callable[[], Awaitable[None]] | None = None,
    retry_after: str | None = None,
    params: Mapping[str, str] | None = None,
) -> T:
    """Poll ``url`` (handed back by the upstream) until ``read`` returns a value.

    ``read`` gets each successful answer and returns the result once the task is
    done, or None to poll again (it may report progress, or raise the task's
    failure). ``retry_after`` is the submit answer's hint for the first wait; without
    one the first poll goes at once.
    ``task`` names the work in a ``poll_timeout`` message ("bfl task").
    """
    backoff = options.backoff()
    retries = 0
    async with AsyncExitStack() as stack:
        # The poll timeout sits outside the cancel guard so that giving up cancels too.
        stack.enter_context(options.deadline(task))
        if cancel is not None:
            await stack.enter_async_context(cancel_upstream_on_exit(cancel, on_error=True))
        # The first poll goes at once unless the submit answer asked for a wait.
        first = retry_after is None
        while True:
            if not first:
                await backoff.wait(retry_after)
            first = False
            response = await upstream.request("GET", url, handed_back="polling URL", params=params)
            retry_after = response.headers.get("retry-after")
            if response.status_code in RETRY_STATUSES and retries < MAX_RETRIES:
                retries += 1
                continue
            if not response.is_success:
                raise upstream.error(response)
            retries = 0
            done = await read(response)
            if done is not None:
                return done
    raise AssertionError("unreachable")  # pragma: no cover - the loop returns or raises
