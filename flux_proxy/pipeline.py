"""The image middleware stack: typed layers around a provider call."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import TYPE_CHECKING, Protocol

from flux_proxy.errors import UpstreamError
from flux_proxy.schema import ImageJob, ImageResult

if TYPE_CHECKING:
    from flux_proxy.runtime import Runtime

CallNext = Callable[[ImageJob], Awaitable[ImageResult]]


class ImageMiddleware(Protocol):
    """One layer: may change the job on the way down and the result on the way up.

    A layer may also define ``check(job) -> None``, raising a GatewayError for input
    it would reject: a streaming response runs every check before it commits to a
    200 status, so bad input still gets a plain 400.
    """

    async def __call__(self, job: ImageJob, call_next: CallNext) -> ImageResult: ...


def run_checks(middlewares: Sequence[ImageMiddleware], job: ImageJob) -> None:
    for middleware in middlewares:
        check = getattr(middleware, "check", None)
        if check is not None:
            check(job)


MiddlewareFactory = Callable[["Runtime"], ImageMiddleware]


def build_stack(middlewares: Sequence[ImageMiddleware], terminal: CallNext) -> CallNext:
    """Compose ``middlewares`` (outermost first) around ``terminal``."""
    call: CallNext = terminal
    for middleware in reversed(middlewares):
        call = partial(middleware, call_next=call)
    return call


async def call_provider(job: ImageJob) -> ImageResult:
    """The innermost layer: the provider's own call."""
    provider = job.route.provider
    images = await provider.generate(job)
    if len(images) < job.n:
        raise UpstreamError(
            f"The {provider.name} upstream returned {len(images)} of the {job.n} images asked for."
        )
    # More than asked (an upstream ignoring n) would break fan-out's count and order.
    return ImageResult(images=images[: job.n], provider=provider.name, report=job.report)
