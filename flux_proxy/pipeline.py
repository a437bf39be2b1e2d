"""The image layer stack: typed layers around a provider call.

A layer is to the image stack what a Starlette middleware is to an ASGI app: a
class, built once with options it validates (``Middleware(cls, **options)``),
that wraps the rest of the stack. Each layer also declares what it does to the
answer (its ``effects``) and which request parameters it honours, so that the
gateway can check a configured order before it serves anything (see
``flux_proxy.composition``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict

from flux_proxy.errors import UpstreamError
from flux_proxy.schema import ImageJob, ImageResult

if TYPE_CHECKING:
    from flux_proxy.runtime import Runtime

CallNext = Callable[[ImageJob], Awaitable[ImageResult]]

# What a layer does to the answer on its way back up (or to the call on its way down).
# The ordering rules between them are data, in flux_proxy.composition.
Effect = Literal[
    "delivers",  # turns every image into the url or b64_json the client gets
    "encodes",  # makes the final bytes, in the format the answer names
    "changes_pixels",  # changes what the image shows (resize, crop, watermark...)
    "splits_calls",  # one call down becomes several
    "shapes_body",  # turns unknown client fields into the provider's own fields
    "consumes_fields",  # takes some client fields out of what goes to the provider
]


class NoOptions(BaseModel):
    """For layers that take no options: any key given is an error naming it."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Layer:
    """Base of every image layer, built-in or a plugin's.

    Subclasses set ``options_model`` (a pydantic model the layer's
    ``options:`` in config are validated against, once, at start-up), ``effects``
    and ``honours``, and implement ``__call__``. ``check`` rejects bad input
    before anything is spent or a streaming response commits to its 200.
    """

    options_model: ClassVar[type[BaseModel]] = NoOptions
    effects: ClassVar[frozenset[Effect]] = frozenset()
    # Public request parameters this layer carries out; a request that sends one
    # no layer in the stack honours is refused (400) rather than silently dropped.
    honours: ClassVar[frozenset[str]] = frozenset()
    # Whether fields the gateway does not know reach the provider through this layer.
    forwards_unknown_fields: ClassVar[bool] = False

    def __init__(self, runtime: Runtime, options: BaseModel) -> None:
        del runtime, options  # a layer that needs neither keeps the signature

    def check(self, job: ImageJob) -> None:
        """Raise a GatewayError for a job this layer would refuse."""
        del job

    async def __call__(self, job: ImageJob, call_next: CallNext) -> ImageResult:
        raise NotImplementedError


LayerClass = type[Layer]

_JOB_FIELD_SET = frozenset(field.name for field in dataclasses.fields(ImageJob))


def derive(job: ImageJob, **changes: Any) -> ImageJob:
    """``dataclasses.replace(job, **changes)`` at about a third of its cost: each layer
    that changes the job copies it, several per request, and replace looks up
    ImageJob's fields and runs its ``__init__`` on every call. Here the new job's
    ``__dict__`` is the old one's with the changes (frozen refuses assignment, not
    this). ImageJob has no ``__post_init__`` for this to skip (tests/test_pipeline.py
    holds it to replace)."""
    if not changes.keys() <= _JOB_FIELD_SET:
        unknown = ", ".join(sorted(changes.keys() - _JOB_FIELD_SET))
        raise TypeError(f"ImageJob has no field {unknown}")
    new = object.__new__(ImageJob)
    state = new.__dict__
    state.update(job.__dict__)
    state.update(changes)
    return new


class Stack:
    """Configured layers (outermost first) around the provider call.

    ``check`` runs every layer's check (and the ``guard``, which refuses what no
    layer honours) without calling anything; calling the stack runs them too,
    before the first layer.
    """

    def __init__(
        self,
        layers: Sequence[Layer],
        guard: Callable[[ImageJob], None],
        terminal: CallNext | None = None,
    ) -> None:
        self.layers = tuple(layers)
        self._guard = guard
        call: CallNext = terminal or call_provider
        for layer in reversed(self.layers):
            call = partial(layer, call_next=call)
        self._call = call

    def honours(self, param: str) -> bool:
        return any(param in layer.honours for layer in self.layers)

    def check(self, job: ImageJob) -> None:
        self._guard(job)
        for layer in self.layers:
            layer.check(job)

    async def __call__(self, job: ImageJob) -> ImageResult:
        self.check(job)
        return await self._call(job)


async def call_provider(job: ImageJob) -> ImageResult:
    """The innermost layer: the provider's own call."""
    provider = job.target.provider
    images = await provider.generate(job)
    if len(images) < job.n:
        raise UpstreamError(
            f"The {provider.name} upstream returned {len(images)} of the {job.n} images asked for."
        )
    # More than asked (an upstream ignoring n) would break fan-out's count and order.
    return ImageResult(images=images[: job.n], provider=provider.name, report=job.report)
