"""What a provider model can make, declared as data.

The image middlewares read only this to decide what to ask the provider for and
what to emulate: which sizes, how many images per call, which formats. Providers
declare defaults per model; a model entry in the config may override any field.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from flux_proxy.fields import FieldRule

OutputFormat = Literal["png", "jpeg", "gif", "webp", "avif"]
LOSSY_FORMATS: frozenset[str] = frozenset({"jpeg", "webp", "avif"})

# FLUX 1.1 [pro]'s published sizes at the 1K tier, keyed by aspect ratio.
FLUX_1K_SIZES: dict[str, tuple[int, int]] = {
    "1:1": (1024, 1024),
    "4:3": (1183, 887),
    "3:4": (887, 1182),
    "5:4": (1145, 916),
    "4:5": (916, 1145),
    "3:2": (1254, 836),
    "2:3": (836, 1254),
    "16:9": (1365, 768),
    "9:16": (768, 1365),
}

# FLUX 1.1 [pro]'s pixel rule (BFL's FluxPro11Inputs; fal and Replicate serve the same
# model): width and height 256-1440, multiples of 32.
FLUX_PRO_SIZES = {"min_side": 256, "max_side": 1440, "multiple_of": 32}

# FLUX 1.1 [pro] Ultra makes about 4 megapixels, shaped by ``aspect_ratio`` alone. BFL
# does not publish the pixel sizes; these are the ones its Ultra outputs are known at
# (UNCERTAIN; 5:4 and 4:5 only where Replicate offers them). An error here costs a
# resize, never a wrong answer: the size layer fits whatever comes back.
FLUX_ULTRA_SIZES: dict[str, tuple[int, int]] = {
    "21:9": (3136, 1344),
    "16:9": (2752, 1536),
    "3:2": (2496, 1664),
    "4:3": (2368, 1792),
    "5:4": (2304, 1856),
    "1:1": (2048, 2048),
    "4:5": (1856, 2304),
    "3:4": (1792, 2368),
    "2:3": (1664, 2496),
    "9:16": (1536, 2752),
    "9:21": (1344, 3136),
}
# The ratios BFL's own Ultra endpoint (and fal's) takes: "between 21:9 and 9:21".
FLUX_ULTRA_RATIOS = ("21:9", "16:9", "3:2", "4:3", "1:1", "3:4", "2:3", "9:16", "9:21")

# Resolution tiers in megapixels (1 MP = 1024 x 1024 here, so "1K" is exactly 1).
RESOLUTION_TIERS: dict[str, float] = {
    "0.5K": 0.25,
    "1K": 1.0,
    "2K": 4.0,
    "4K": 16.0,
    "0.25": 0.25,
    "0.5": 0.5,
    "1": 1.0,
    "2": 2.0,
    "4": 4.0,
    "8": 8.0,
    "16": 16.0,
}


class SizeSupport(BaseModel):
    """The pixel sizes a model can be asked for."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    min_side: int = Field(1, ge=1)
    max_side: int = Field(14142, ge=1)
    multiple_of: int = Field(1, ge=1)
    max_pixels: int | None = Field(None, ge=1)
    # When set, the model makes only these sizes (e.g. ["1024x1024", "1536x1024"]).
    presets: tuple[tuple[int, int], ...] = ()

    @model_validator(mode="before")
    @classmethod
    def _parse_presets(cls, data: Any) -> Any:
        if isinstance(data, dict) and "presets" in data:
            data = dict(data)
            data["presets"] = [_parse_preset(item) for item in data["presets"] or ()]
        return data

    @model_validator(mode="after")
    def _check_range(self) -> SizeSupport:
        if self.min_side > self.max_side:
            raise ValueError("min_side must not exceed max_side")
        return self


def _parse_preset(item: Any) -> Any:
    if isinstance(item, str) and "x" in item:
        width, _, height = item.partition("x")
        return (int(width), int(height))
    return item


class Capabilities(BaseModel):
    """Everything the middlewares need to know about one provider model."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    sizes: SizeSupport = SizeSupport()
    # Aspect ratios the model is known for, with its size at the 1K tier.
    ratios: dict[str, tuple[int, int]] = Field(default_factory=lambda: dict(FLUX_1K_SIZES))
    resolutions: dict[str, float] = Field(default_factory=lambda: dict(RESOLUTION_TIERS))
    default_size: tuple[int, int] = (1024, 1024)
    max_images_per_call: int = Field(1, ge=1)
    # Formats the provider can return itself, best first.
    output_formats: tuple[OutputFormat, ...] = ("png",)
    # Whether the provider honours output_compression for its lossy formats.
    accepts_compression: bool = False
    # Whether the provider takes a seed at all (OpenAI's own API refuses one with a 400).
    accepts_seed: bool = True
    # The provider's name, type and range per public field, e.g.
    # {"output_compression": "output_quality", "safety_tolerance": {"type": "string"}}.
    fields: dict[str, FieldRule] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _parse_sizes(cls, data: Any) -> Any:
        if isinstance(data, dict):
            data = dict(data)
            if isinstance(data.get("default_size"), str):
                data["default_size"] = _parse_preset(data["default_size"])
            if isinstance(data.get("ratios"), dict):
                data["ratios"] = {k: _parse_preset(v) for k, v in data["ratios"].items()}
        return data

    def accepts(self, param: str) -> bool:
        """Whether a public parameter may be sent to the provider at all."""
        return self.accepts_seed if param == "seed" else True

    def with_overrides(self, overrides: dict[str, Any]) -> Capabilities:
        """A copy with config overrides merged in (nested tables merge key by key)."""
        merged = self.model_dump()
        for key, value in overrides.items():
            if isinstance(value, dict) and key in ("sizes", "fields"):
                merged[key] = {**merged[key], **value}
            else:
                merged[key] = value
        return Capabilities.model_validate(merged)


def flux_ultra_capabilities(ratios: tuple[str, ...], **declared: Any) -> Capabilities:
    """An Ultra model's capabilities: its sizes from FLUX_ULTRA_SIZES, plus ``declared``.

    Shapes at the 1K tier are exactly half the native sizes, so "2K" asks for (and
    gets) the native pixels without a resize.
    """
    sizes = {ratio: FLUX_ULTRA_SIZES[ratio] for ratio in ratios}
    return Capabilities(
        sizes=SizeSupport(presets=tuple(sizes.values())),
        ratios={ratio: (w // 2, h // 2) for ratio, (w, h) in sizes.items()},
        default_size=sizes["1:1"],
        **declared,
    )
