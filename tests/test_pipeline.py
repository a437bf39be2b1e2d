"""The stack's own helpers, held to what they stand in for."""

from __future__ import annotations

import dataclasses

import pytest

from flux_proxy.pipeline import derive
from flux_proxy.schema import ImageJob, ImageRequest, Report


async def _progress(progress: object) -> None:
    del progress


def _job() -> ImageJob:
    """A job with no field at its default, so a field derive forgot to copy shows."""
    values = {
        "request": ImageRequest(prompt="a lighthouse"),
        "target": object(),
        "report": Report(),
        "public_url": "https://gateway.example",
        "n": 3,
        "width": 640,
        "height": 480,
        "output_format": "webp",
        "output_compression": 70,
        "seed": 7,
        "fields": {"style": "raw"},
        "progress": _progress,
        "verify_urls": False,
    }
    assert set(values) == {field.name for field in dataclasses.fields(ImageJob)}
    return ImageJob(**values)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "changes",
    [{}, {"width": 1024, "height": 768}, {"n": 1, "seed": None}, {"verify_urls": True}],
)
def test_derive_makes_what_replace_makes(changes: dict[str, object]) -> None:
    job = _job()
    derived = derive(job, **changes)
    assert derived == dataclasses.replace(job, **changes)  # type: ignore[arg-type]
    assert derived is not job
    for field in dataclasses.fields(ImageJob):  # kept ones are the same objects, not copies
        if field.name not in changes:
            assert getattr(derived, field.name) is getattr(job, field.name)
    with pytest.raises(dataclasses.FrozenInstanceError):
        derived.n = 2  # type: ignore[misc]


def test_derive_refuses_a_field_the_job_has_not() -> None:
    with pytest.raises(TypeError, match="no field colour"):
        derive(_job(), colour="red")


def test_image_job_has_no_post_init_for_derive_to_skip() -> None:
    assert not hasattr(ImageJob, "__post_init__")
