"""Size conversion: what the client asked for, and what the provider can make.

Every request resolves to one exact target size in pixels. ``size: "WxH"`` is taken
literally; a shape (``size: "W:H"`` or ``aspect_ratio``) with a ``resolution`` tier
is matched to the model's nearest ratio (by distance of log(width/height)) and its
nearest tier (by distance of log(pixels)). The provider is then asked for the
nearest size it can make, and the gateway resizes to the target where they differ.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from flux_proxy.capabilities import Capabilities, SizeSupport
from flux_proxy.errors import InvalidRequest
from flux_proxy.kept import Kept

# Numbers are bounded in length: a thousand-digit "side" is malformed, not a big number
# to overflow on (and a ratio of two such numbers would be 0 or infinite).
_PIXELS = re.compile(r"^\s*(\d{1,9})\s*[xX]\s*(\d{1,9})\s*$")
_SIGNED_PIXELS = re.compile(r"^\s*(-?\d{1,9})\s*[xX]\s*(-?\d{1,9})\s*$")
_NUMBER = r"(\d{1,7}(?:\.\d{1,7})?)"
_RATIO = re.compile(rf"^\s*{_NUMBER}\s*:\s*{_NUMBER}\s*$")
_TIER_K = re.compile(rf"^\s*{_NUMBER}\s*[kK]\s*$")
_MEGAPIXELS = re.compile(rf"^\s*{_NUMBER}\s*(?:[mM][pP])?\s*$")
# Replicate-style exact pixels, sent as extra fields.
PIXEL_FIELDS = ("width", "height")


@dataclass(frozen=True, slots=True)
class SizeLimits:
    """The gateway's own bounds, whatever the model could make."""

    max_side: int = 14142
    max_pixels: int = 4096 * 4096


@dataclass(frozen=True, slots=True)
class TargetSize:
    width: int
    height: int
    # How the target was reached, for the normalisation report.
    how: str
    # The client named exact pixels (as opposed to a shape, a tier or nothing).
    exact: bool

    @property
    def text(self) -> str:
        return f"{self.width}x{self.height}"


def requested_target(
    *,
    size: str | None,
    aspect_ratio: str | None,
    resolution: str | None,
    extras: Mapping[str, Any],
    capabilities: Capabilities,
    limits: SizeLimits,
) -> TargetSize:
    """The exact pixel size a request must produce, ``width``/``height`` fields included."""
    pixels = pixel_fields(extras)
    # Replicate-style clients send aspect_ratio "custom" with width and height.
    if aspect_ratio is not None and aspect_ratio.strip().lower() == "custom":
        if pixels is None:
            raise InvalidRequest(
                "aspect_ratio 'custom' needs integer 'width' and 'height'.",
                param="aspect_ratio",
            )
        aspect_ratio = None
    # width and height are exact pixels: below an explicit size, above a shape.
    if pixels is not None and names_no_size(size):
        size = f"{pixels[0]}x{pixels[1]}"
    return resolve_target(
        size=size,
        aspect_ratio=aspect_ratio,
        resolution=resolution,
        capabilities=capabilities,
        limits=limits,
    )


def names_no_size(size: str | None) -> bool:
    """Whether ``size`` leaves the size to the other fields: absent, or ``auto`` (in any
    case, spaces around it allowed). Every layer asks this one question, so a request
    is never read as sized by one and unsized by another."""
    return size is None or size.strip().lower() == "auto"


def pixel_fields(extras: Mapping[str, Any]) -> tuple[int, int] | None:
    """Integer ``width`` and ``height`` the client sent as extra fields, if both."""
    if not extras:  # most requests send none: no lookups
        return None
    width, height = extras.get("width"), extras.get("height")
    if type(width) is int and type(height) is int:
        return width, height
    return None


@dataclass(frozen=True, slots=True)
class SizePlan:
    """One request's size: the exact target, and the nearest size the provider makes."""

    target: TargetSize
    native: tuple[int, int]


class SizePlanner:
    """Resolves a request's size once per distinct ask and model.

    Requests repeat a handful of sizes, and resolving one (parsing, the nearest ratio
    and tier, the provider's nearest size) ran several times per request: admission's
    demand, the size layer's check, its call. A plan is kept per model (by identity:
    the entry holds the capabilities it was made for) and per asked size; refusals are
    not kept, and neither are asks too long to be worth keeping (a size padded with
    spaces is valid), so what a client sends cannot grow the table past MAX_PLANS.
    """

    MAX_PLANS = 1024
    MAX_KEY_TEXT = 64

    def __init__(self, limits: SizeLimits) -> None:
        self._limits = limits
        self._plans: Kept[tuple[Any, ...], tuple[Capabilities, SizePlan]] = Kept(self.MAX_PLANS)

    def plan(
        self,
        *,
        size: str | None,
        aspect_ratio: str | None,
        resolution: str | None,
        extras: Mapping[str, Any],
        capabilities: Capabilities,
    ) -> SizePlan:
        key = (id(capabilities), size, aspect_ratio, resolution, pixel_fields(extras))
        found = self._plans.get(key)
        if found is not None and found[0] is capabilities:
            return found[1]
        target = requested_target(
            size=size,
            aspect_ratio=aspect_ratio,
            resolution=resolution,
            extras=extras,
            capabilities=capabilities,
            limits=self._limits,
        )
        plan = SizePlan(target, native_size(target.width, target.height, capabilities.sizes))
        if sum(len(text) for text in (size, aspect_ratio, resolution) if text) <= self.MAX_KEY_TEXT:
            self._plans.keep(key, (capabilities, plan))
        return plan


def resolve_target(
    *,
    size: str | None,
    aspect_ratio: str | None,
    resolution: str | None,
    capabilities: Capabilities,
    limits: SizeLimits,
) -> TargetSize:
    """The exact pixel size this request must produce."""
    if size is not None and not names_no_size(size):
        pixels = _parse_pixels(size)
        if pixels is not None:
            width, height = pixels
            _check_limits(width, height, limits, param="size")
            return TargetSize(width, height, "exact pixels", exact=True)
        ratio = _parse_ratio(size, param="size")
        return _from_shape(ratio, size.strip(), resolution, capabilities, limits, "size")
    if aspect_ratio is not None:
        ratio = _parse_ratio(aspect_ratio, param="aspect_ratio")
        return _from_shape(ratio, aspect_ratio.strip(), resolution, capabilities, limits, "size")
    if resolution is not None:
        width, height = capabilities.default_size
        return _from_shape(
            width / height, "default shape", resolution, capabilities, limits, "size"
        )
    width, height = capabilities.default_size
    return TargetSize(width, height, "model default", exact=False)


def nearest_ratio(ratio: float, candidates: dict[str, tuple[int, int]]) -> str:
    """The candidate whose width/height is nearest ``ratio`` on a log scale."""
    target = math.log(ratio)
    return min(candidates, key=lambda key: abs(math.log(_ratio_of(candidates[key])) - target))


def nearest_tier(megapixels: float, tiers: dict[str, float]) -> float:
    """The tier value nearest ``megapixels`` on a log scale."""
    target = math.log(megapixels)
    return min(tiers.values(), key=lambda value: abs(math.log(value) - target))


def native_size(width: int, height: int, support: SizeSupport) -> tuple[int, int]:
    """The size the provider is asked for: the nearest it can make to ``width x height``."""
    if support.presets:
        ratio, pixels = math.log(width / height), math.log(width * height)
        return min(
            support.presets,
            key=lambda p: (
                round(abs(math.log(p[0] / p[1]) - ratio), 6),
                abs(math.log(p[0] * p[1]) - pixels),
            ),
        )
    scale = 1.0
    if support.max_pixels is not None and width * height > support.max_pixels:
        scale = math.sqrt(support.max_pixels / (width * height))
    scale = min(scale, support.max_side / width, support.max_side / height)
    scale = max(scale, support.min_side / width, support.min_side / height)
    step = support.multiple_of
    fitted_w = _fit_side(width * scale, support)
    fitted_h = _fit_side(height * scale, support)
    # Rounding up to a multiple can push past the pixel cap: step the longer side down.
    while support.max_pixels is not None and fitted_w * fitted_h > support.max_pixels:
        if fitted_w >= fitted_h and fitted_w - step >= support.min_side:
            fitted_w -= step
        elif fitted_h - step >= support.min_side:
            fitted_h -= step
        else:
            break
    return fitted_w, fitted_h


def _fit_side(value: float, support: SizeSupport) -> int:
    step = support.multiple_of
    lowest = math.ceil(support.min_side / step) * step
    highest = (support.max_side // step) * step
    return min(max(round(value / step) * step, lowest), highest)


def _from_shape(
    ratio: float,
    label: str,
    resolution: str | None,
    capabilities: Capabilities,
    limits: SizeLimits,
    param: str,
) -> TargetSize:
    key = nearest_ratio(ratio, capabilities.ratios)
    base_w, base_h = capabilities.ratios[key]
    megapixels = 1.0
    if resolution is not None:
        megapixels = nearest_tier(_parse_megapixels(resolution), capabilities.resolutions)
    if megapixels == 1.0:
        width, height = base_w, base_h
    else:
        scale = math.sqrt(megapixels)
        width, height = max(1, round(base_w * scale)), max(1, round(base_h * scale))
    _check_limits(width, height, limits, param="resolution" if resolution else param)
    how = f"{label} -> nearest ratio {key} at {_tier_label(megapixels)}"
    return TargetSize(width, height, how, exact=False)


def _tier_label(megapixels: float) -> str:
    side = math.sqrt(megapixels)
    return f"{side:g}K" if side in (0.5, 1, 2, 4) else f"{megapixels:g} MP"


def _ratio_of(size: tuple[int, int]) -> float:
    return size[0] / size[1]


def _parse_pixels(text: str) -> tuple[int, int] | None:
    match = _PIXELS.match(text)
    if match:
        return int(match[1]), int(match[2])
    if _SIGNED_PIXELS.match(text):
        raise InvalidRequest(
            f"Invalid size {text!r}: width and height must be positive integers.", param="size"
        )
    return None


def _parse_ratio(text: str, *, param: str) -> float:
    match = _RATIO.match(text)
    if not match:
        raise InvalidRequest(
            f"Invalid {param} {text!r}: expected 'WIDTHxHEIGHT' in pixels, 'W:H' or 'auto'."
            if param == "size"
            else f"Invalid aspect_ratio {text!r}: expected 'W:H', e.g. '16:9'.",
            param=param,
        )
    width, height = float(match[1]), float(match[2])
    if width <= 0 or height <= 0:
        raise InvalidRequest(f"Invalid {param} {text!r}: both sides must be positive.", param=param)
    return width / height


def _parse_megapixels(text: str) -> float:
    if (match := _TIER_K.match(text)) is not None:
        value = float(match[1]) ** 2
    elif (match := _MEGAPIXELS.match(text)) is not None:
        value = float(match[1])
    else:
        raise InvalidRequest(
            f"Invalid resolution {text!r}: expected a tier such as '0.5K', '1K', '2K', '4K' "
            "or megapixels such as '0.25', '1', '4'.",
            param="resolution",
        )
    if value <= 0:
        raise InvalidRequest(f"Invalid resolution {text!r}: must be positive.", param="resolution")
    return value


def _check_limits(width: int, height: int, limits: SizeLimits, *, param: str) -> None:
    if width < 1 or height < 1:
        raise InvalidRequest(
            f"Invalid size {width}x{height}: each side must be at least 1 pixel.", param=param
        )
    if width > limits.max_side or height > limits.max_side:
        raise InvalidRequest(
            f"Size {width}x{height} is too large: each side must be at most "
            f"{limits.max_side} pixels.",
            param=param,
        )
    if width * height > limits.max_pixels:
        raise InvalidRequest(
            f"Size {width}x{height} is {width * height} pixels, above this gateway's limit "
            f"of {limits.max_pixels}.",
            param=param,
        )
