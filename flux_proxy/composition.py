"""Building the configured layer stack, and refusing one that cannot work.

The ``middlewares:`` list is checked once, when the gateway is built: every name
must be installed and appear once, every layer's options must validate against
its ``options_model``, and the order must keep the rules below. A stack that
passes is then guarded per request: a parameter that no configured layer honours
gets a 400 naming it, never a silent drop or an answer that differs from what the
client asked for.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ValidationError

from flux_proxy.config import ConfigError, MiddlewareEntry
from flux_proxy.errors import InvalidRequest
from flux_proxy.pipeline import Effect, Layer, LayerClass, Stack
from flux_proxy.schema import ImageJob, ImageRequest
from flux_proxy.sizes import names_no_size

if TYPE_CHECKING:
    from flux_proxy.runtime import Runtime


@dataclass(frozen=True, slots=True)
class OrderRule:
    """A layer with effect ``outer`` must wrap (come before) every layer with ``inner``."""

    outer: Effect
    inner: Effect
    reason: str


ORDER_RULES: tuple[OrderRule, ...] = (
    OrderRule(
        "delivers",
        "encodes",
        "the answer must hold the bytes in the format the answer names",
    ),
    OrderRule(
        "delivers",
        "changes_pixels",
        "an image changed after it was delivered is not the one its url or b64_json holds",
    ),
    OrderRule(
        "encodes",
        "changes_pixels",
        "pixels changed after they were encoded would reach the client in another format "
        "than the answer names",
    ),
)

# Effects some layer of every stack must have, and why.
REQUIRED_EFFECTS: Mapping[Effect, str] = {
    "delivers": "it makes the url or b64_json the client gets; without it an image the "
    "provider returns as bytes has no url, and one it returns as a link has no b64_json",
}

# Request parameters the gateway honours whatever the stack: routing, the prompt and
# seed (every provider takes them), streaming (the edge renders it).
CORE_PARAMS = frozenset({"model", "prompt", "seed", "stream"})


@dataclass(frozen=True, slots=True)
class _Placed:
    index: int
    name: str
    cls: LayerClass
    options: BaseModel

    @property
    def label(self) -> str:
        return f"{self.name!r} (middlewares[{self.index}])"


def build_stack(
    entries: Sequence[str | MiddlewareEntry],
    available: Mapping[str, LayerClass],
    runtime: Runtime,
) -> Stack:
    """The configured stack, or a ConfigError that names the layers and the rule."""
    placed = _place(entries, available)
    _check_required(placed, available)
    _check_order(placed)
    layers = [item.cls(runtime, item.options) for item in placed]
    return Stack(layers, StackGuard([item.name for item in placed], layers, available))


def _place(
    entries: Sequence[str | MiddlewareEntry], available: Mapping[str, LayerClass]
) -> list[_Placed]:
    placed: list[_Placed] = []
    seen: dict[str, int] = {}
    for index, entry in enumerate(entries):
        where = f"middlewares[{index}]"
        name, raw = (entry, {}) if isinstance(entry, str) else (entry.name, entry.options)
        cls = available.get(name)
        if cls is None:
            installed = ", ".join(sorted(available)) or "none"
            raise ConfigError(f"{where}: unknown middleware {name!r} (installed: {installed})")
        if name in seen:
            raise ConfigError(
                f"{where}: {name!r} is listed twice (first at middlewares[{seen[name]}]); "
                "each layer runs once in the stack"
            )
        seen[name] = index
        placed.append(_Placed(index, name, cls, _options(cls, raw, where)))
    return placed


def _options(cls: LayerClass, raw: Mapping[str, Any], where: str) -> BaseModel:
    try:
        return cls.options_model.model_validate(dict(raw))
    except ValidationError as exc:
        first = exc.errors()[0]
        key = ".".join(str(part) for part in (f"{where}.options", *first["loc"]))
        raise ConfigError(f"{key}: {first['msg']}") from None


def _check_required(placed: Sequence[_Placed], available: Mapping[str, LayerClass]) -> None:
    for effect, why in REQUIRED_EFFECTS.items():
        if any(effect in item.cls.effects for item in placed):
            continue
        offer = sorted(name for name, cls in available.items() if effect in cls.effects)
        add = " or ".join(repr(name) for name in offer) or "a layer that does"
        raise ConfigError(
            f"middlewares: no layer {effect} the answer (add {add}, outermost): {why}"
        )


def _check_order(placed: Sequence[_Placed]) -> None:
    for rule in ORDER_RULES:
        for inner_pos, inner in enumerate(placed):
            if rule.inner not in inner.cls.effects:
                continue
            for outer in placed[inner_pos + 1 :]:
                # Each name appears once (checked above), so outer is never inner.
                if rule.outer in outer.cls.effects:
                    raise ConfigError(
                        f"middlewares: {inner.label} must come after {outer.label}: "
                        f"{outer.name} {_VERBS[rule.outer]} and {inner.name} "
                        f"{_VERBS[rule.inner]}, and {rule.reason}"
                    )


_VERBS: Mapping[Effect, str] = {
    "delivers": "delivers the answer",
    "encodes": "encodes the images",
    "changes_pixels": "changes the images' pixels",
    "splits_calls": "splits the provider call",
    "shapes_body": "shapes the provider's body",
    "consumes_fields": "consumes client fields",
}


class StackGuard:
    """Refuses, per request, what no configured layer honours (a 400 naming it)."""

    def __init__(
        self,
        names: Sequence[str],
        layers: Sequence[Layer],
        available: Mapping[str, LayerClass],
    ) -> None:
        self._layers = ", ".join(names)
        # Which installed layer would honour a parameter: the refusal names it.
        self._offered = {param: name for name, cls in available.items() for param in cls.honours}
        self._honoured = CORE_PARAMS.union(*(layer.honours for layer in layers))
        self._forwards = any(layer.forwards_unknown_fields for layer in layers)

    def __call__(self, job: ImageJob) -> None:
        request = job.request
        sent = request.model_fields_set
        for param in ImageRequest.model_fields:
            if param not in sent or param in self._honoured:
                continue
            if param == "n":
                self._check_native_n(job)
                continue
            value = getattr(request, param)
            if value is None or (param == "size" and names_no_size(value)):
                continue  # nothing asked: the default applies
            offered = self._offered.get(param)
            raise self._refuse(
                param,
                f"the '{offered}' layer that carries it out is not configured"
                if offered
                else "no configured layer carries it out",
            )
        if self._forwards:
            return
        for param, value in request.extras.items():
            if value is not None and param not in self._honoured:
                raise self._refuse(
                    param,
                    f"'{param}' is not a parameter the gateway knows and no configured "
                    "layer passes unknown parameters on to the provider",
                )

    def _check_native_n(self, job: ImageJob) -> None:
        per_call = job.target.capabilities.max_images_per_call
        if job.request.n > per_call:
            raise self._refuse(
                "n",
                f"this model's provider makes at most {per_call} image(s) per call and no "
                "configured layer splits a request into several calls",
            )

    def _refuse(self, param: str, why: str) -> InvalidRequest:
        return InvalidRequest(
            f"This gateway's middleware stack ({self._layers or 'empty'}) does not honour "
            f"'{param}': {why}. The request is refused rather than answered without it.",
            param=param,
            code="unsupported_parameter",
        )
