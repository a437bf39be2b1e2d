"""Two image layers a third party might ship, installed through the entry point.

``watermark`` stamps a coloured band with a label into a corner of every image (it
changes pixels, so the stack must encode and deliver after it); ``prompt_policy``
refuses prompts with blocked words before anything is spent.
"""

from __future__ import annotations

from typing import Literal

from PIL import Image, ImageDraw
from pydantic import BaseModel, ConfigDict, Field

from flux_proxy.sdk import (
    CallNext,
    ContentPolicyViolation,
    GeneratedImage,
    ImageJob,
    ImageResult,
    Layer,
    RegisterMiddleware,
    Runtime,
    decode_image,
    hookimpl,
)

Corner = Literal["top-left", "top-right", "bottom-left", "bottom-right"]


class WatermarkOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    text: str = Field("flux-proxy", min_length=1, max_length=64)
    colour: tuple[int, int, int] = (255, 0, 255)
    # The band's size as a fraction of the image's smaller side.
    size: float = Field(0.25, gt=0, le=1)
    corner: Corner = "bottom-right"


class WatermarkLayer(Layer):
    options_model = WatermarkOptions
    effects = frozenset({"changes_pixels"})

    def __init__(self, runtime: Runtime, options: WatermarkOptions) -> None:
        self._runtime = runtime
        self._options = options

    async def __call__(self, job: ImageJob, call_next: CallNext) -> ImageResult:
        result = await call_next(job)
        for image in result.images:
            await self._stamp(image)
        job.report.record("watermark", "emulated", f"stamped {self._options.text!r}")
        return result

    async def _stamp(self, image: GeneratedImage) -> None:
        await self._runtime.fetcher.ensure_data(image)
        source = image.pixels if image.pixels is not None else image.data
        assert source is not None  # ensure_data gave it bytes
        image.pixels = await self._runtime.images.run(stamp, source, self._options)
        image.data = image.url = image.media_type = None


def stamp(source: Image.Image | bytes, options: WatermarkOptions) -> Image.Image:
    image = (decode_image(source) if isinstance(source, bytes) else source).convert("RGB")
    side = max(1, round(min(image.size) * options.size))
    left = 0 if options.corner.endswith("left") else image.width - side
    top = 0 if options.corner.startswith("top") else image.height - side
    draw = ImageDraw.Draw(image)
    draw.rectangle((left, top, left + side - 1, top + side - 1), fill=options.colour)
    draw.text((left + 2, top + 2), options.text, fill=(255 - options.colour[0], 0, 0))
    return image


class PromptPolicyOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    blocked_words: tuple[str, ...] = Field(min_length=1)


class PromptPolicyLayer(Layer):
    options_model = PromptPolicyOptions

    def __init__(self, runtime: Runtime, options: PromptPolicyOptions) -> None:
        self._blocked = tuple(word.lower() for word in options.blocked_words)

    def check(self, job: ImageJob) -> None:
        words = set(job.request.prompt.lower().split())
        hit = next((word for word in self._blocked if word in words), None)
        if hit is not None:
            raise ContentPolicyViolation(
                f"This gateway's prompt policy does not allow the word {hit!r}.", param="prompt"
            )

    async def __call__(self, job: ImageJob, call_next: CallNext) -> ImageResult:
        return await call_next(job)


@hookimpl
def register_middlewares(register: RegisterMiddleware) -> None:
    register("watermark", WatermarkLayer)
    register("prompt_policy", PromptPolicyLayer)
