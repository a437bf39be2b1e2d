"""The local renderer: a real provider that draws placeholder pictures with Pillow.

It needs no network and no GPU. The picture is a deterministic function of the
prompt and the seed, so demos and offline tests get repeatable, distinct images.
It is not an image model and says so in its model description.
"""

from __future__ import annotations

import hashlib
import random
import secrets

from PIL import Image, ImageDraw, ImageOps

from flux_proxy.capabilities import Capabilities
from flux_proxy.config import ProviderConfig
from flux_proxy.hookspecs import RegisterProvider, hookimpl
from flux_proxy.imaging import MEDIA_TYPES, encode
from flux_proxy.runtime import Runtime
from flux_proxy.schema import GeneratedImage, ImageJob

DESCRIPTION = (
    "flux-proxy local renderer: a placeholder for demos and offline tests. It draws "
    "a deterministic abstract picture from the prompt and seed; it is not an image model."
)


class LocalRenderer:
    name = "local"

    def __init__(self, runtime: Runtime) -> None:
        self._images = runtime.images

    def capabilities(self, model: ProviderConfig) -> Capabilities:
        return Capabilities(
            max_images_per_call=1,
            output_formats=("png", "jpeg", "webp"),
            accepts_compression=True,
        )

    def description(self, model: ProviderConfig) -> str:
        return DESCRIPTION

    def check(self, job: ImageJob) -> None:
        del job  # the renderer draws whatever it is asked for

    async def generate(self, job: ImageJob) -> list[GeneratedImage]:
        # No size layer in the stack: the model's declared default size.
        default_width, default_height = job.target.capabilities.default_size
        width, height = job.width or default_width, job.height or default_height
        fmt = job.output_format or "png"
        first_seed = job.seed if job.seed is not None else secrets.randbelow(2**31)
        job.report.record("prompt", "passthrough", "drawn into the picture's pattern")
        if job.seed is not None:
            job.report.suggest("seed", "passthrough", "picks the pattern")
        for name in job.fields:
            job.report.record(name, "ignored", "the local renderer has no such option")
        images = []
        for index in range(job.n):
            seed = first_seed + index
            data = await self._images.run(
                render_encoded,
                job.request.prompt,
                seed,
                width,
                height,
                fmt,
                job.output_compression,
                pixels=width * height,
                fmt=fmt,
            )
            images.append(
                GeneratedImage(
                    data=data, media_type=MEDIA_TYPES[fmt], width=width, height=height, seed=seed
                )
            )
        return images


def render(prompt: str, seed: int, width: int, height: int) -> Image.Image:
    """A picture that depends only on (prompt, seed) and the size."""
    digest = hashlib.sha256(f"{seed}\x00{prompt}".encode()).digest()
    rng = random.Random(digest)  # noqa: S311 - repeatable pictures, not secrets

    def colour() -> tuple[int, int, int]:
        return (rng.randrange(256), rng.randrange(256), rng.randrange(256))

    gradient = Image.linear_gradient("L").rotate(rng.uniform(0, 360), expand=False)
    canvas = ImageOps.colorize(gradient.resize((width, height)), colour(), colour())
    draw = ImageDraw.Draw(canvas)
    for _ in range(rng.randint(6, 14)):
        x0, x1 = sorted(rng.uniform(-0.2, 1.2) * width for _ in range(2))
        y0, y1 = sorted(rng.uniform(-0.2, 1.2) * height for _ in range(2))
        shape = draw.ellipse if rng.random() < 0.6 else draw.rectangle
        shape((x0, y0, x1, y1), fill=colour(), outline=colour(), width=max(1, width // 200))
    return canvas


def render_encoded(
    prompt: str, seed: int, width: int, height: int, fmt: str, compression: int | None
) -> bytes:
    return encode(render(prompt, seed, width, height), fmt, compression)


@hookimpl
def register_providers(register: RegisterProvider) -> None:
    register("local", LocalRenderer)
