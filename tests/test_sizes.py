"""Size conversion rules: parsing, nearest matching, native sizes, limits."""

from __future__ import annotations

import pytest

from flux_proxy.capabilities import FLUX_1K_SIZES, Capabilities, SizeSupport
from flux_proxy.errors import InvalidRequest
from flux_proxy.sizes import (
    SizeLimits,
    SizePlan,
    SizePlanner,
    native_size,
    nearest_ratio,
    nearest_tier,
    resolve_target,
)

CAPS = Capabilities()
LIMITS = SizeLimits()
BFL = SizeSupport(min_side=256, max_side=1440, multiple_of=32)


def target(
    size: str | None = None,
    aspect_ratio: str | None = None,
    resolution: str | None = None,
    capabilities: Capabilities = CAPS,
    limits: SizeLimits = LIMITS,
) -> tuple[int, int]:
    resolved = resolve_target(
        size=size,
        aspect_ratio=aspect_ratio,
        resolution=resolution,
        capabilities=capabilities,
        limits=limits,
    )
    return resolved.width, resolved.height


@pytest.mark.parametrize(("ratio", "expected"), list(FLUX_1K_SIZES.items()))
def test_the_nine_published_1k_sizes_come_out_exactly(ratio, expected):
    assert target(aspect_ratio=ratio) == expected
    assert target(size=ratio) == expected
    assert target(aspect_ratio=ratio, resolution="1K") == expected


def test_published_table_is_flux_1_1_pro():
    assert FLUX_1K_SIZES == {
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


def test_nearest_ratio_is_by_log_distance():
    candidates = {"4:1": (2048, 512), "8:1": (2896, 362)}
    assert nearest_ratio(7.0, candidates) == "8:1"
    # On a linear scale 5.9 is nearer 4 than 8 (1.9 vs 2.1); on a log scale it is nearer 8.
    assert nearest_ratio(5.9, candidates) == "8:1"
    assert nearest_ratio(5.5, candidates) == "4:1"


def test_seven_to_one_among_four_and_eight_gives_eight_to_one():
    caps = Capabilities(ratios={"4:1": (2048, 512), "8:1": (2896, 362)})
    assert target(aspect_ratio="7:1", capabilities=caps) == (2896, 362)


def test_unlisted_ratio_maps_to_nearest_published():
    assert target(aspect_ratio="21:9") == FLUX_1K_SIZES["16:9"]
    assert target(aspect_ratio="1:1.1") == FLUX_1K_SIZES["1:1"]
    assert target(aspect_ratio="1.5:1") == FLUX_1K_SIZES["3:2"]


@pytest.mark.parametrize(
    ("resolution", "expected"),
    [
        ("0.5K", (512, 512)),
        ("1K", (1024, 1024)),
        ("2K", (2048, 2048)),
        ("4K", (4096, 4096)),
        ("0.25", (512, 512)),
        ("1", (1024, 1024)),
        ("4", (2048, 2048)),
        ("1.5", (1448, 1448)),  # nearest tier on a log scale is 2 MP, not 1 MP
        ("3K", (2896, 2896)),  # 9 MP -> 8 MP
    ],
)
def test_resolution_tiers_by_log_pixels(resolution, expected):
    assert target(aspect_ratio="1:1", resolution=resolution) == expected


def test_nearest_tier_log_scale():
    tiers = {"a": 1.0, "b": 4.0}
    assert nearest_tier(1.9, tiers) == 1.0
    assert nearest_tier(2.1, tiers) == 4.0


def test_tier_scales_the_published_size():
    assert target(aspect_ratio="16:9", resolution="2K") == (2730, 1536)
    assert target(size="16:9", resolution="0.5K") == (682, 384)


def test_exact_size_wins_over_shape_and_tier():
    assert target(size="1920x1080", aspect_ratio="1:1", resolution="4K") == (1920, 1080)


@pytest.mark.parametrize("size", ["1x1", "14142x1", "1x14142", "4096x4096"])
def test_exact_sizes_at_the_limits(size):
    width, _, height = size.partition("x")
    assert target(size=size) == (int(width), int(height))


def test_auto_and_nothing_give_model_default():
    assert target(size="auto") == (1024, 1024)
    assert target() == (1024, 1024)
    assert target(capabilities=Capabilities(default_size=(768, 512))) == (768, 512)


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"size": "0x1024"}, "size"),
        ({"size": "1024x0"}, "size"),
        ({"size": "-5x100"}, "size"),
        ({"size": "14143x10"}, "size"),
        ({"size": "big"}, "size"),
        ({"size": "1024 by 1024"}, "size"),
        ({"size": "0:1"}, "size"),
        ({"size": "4097x4096"}, "size"),  # above the default pixel cap
        ({"aspect_ratio": "wide"}, "aspect_ratio"),
        ({"aspect_ratio": "16:0"}, "aspect_ratio"),
        ({"aspect_ratio": "1:1", "resolution": "huge"}, "resolution"),
        ({"aspect_ratio": "1:1", "resolution": "0"}, "resolution"),
    ],
)
def test_bad_sizes_are_400_naming_the_param(kwargs, param):
    with pytest.raises(InvalidRequest) as caught:
        target(**kwargs)
    assert caught.value.param == param
    assert caught.value.status_code == 400


def test_pixel_cap_is_configurable():
    with pytest.raises(InvalidRequest):
        target(size="1100x1000", limits=SizeLimits(max_pixels=1_000_000))
    assert target(size="1000x1000", limits=SizeLimits(max_pixels=1_000_000)) == (1000, 1000)


@pytest.mark.parametrize(
    ("wanted", "native"),
    [
        ((1024, 1024), (1024, 1024)),
        ((1183, 887), (1184, 896)),
        ((1920, 1080), (1440, 800)),  # scaled into 1440 keeping the shape, then x32
        ((100, 100), (256, 256)),
        ((14142, 1), (1440, 256)),
    ],
)
def test_native_size_respects_range_and_multiple(
    wanted: tuple[int, int], native: tuple[int, int]
) -> None:
    made = native_size(*wanted, BFL)
    assert made == native
    assert all(side % 32 == 0 and 256 <= side <= 1440 for side in made)


def test_native_size_respects_pixel_cap():
    support = SizeSupport(max_side=4096, multiple_of=16, max_pixels=1024 * 1024)
    width, height = native_size(3000, 2000, support)
    assert width * height <= 1024 * 1024
    assert width % 16 == 0 and height % 16 == 0
    assert abs(width / height - 1.5) < 0.05


def test_native_size_picks_nearest_preset():
    support = SizeSupport(presets=((1024, 1024), (1536, 1024), (1024, 1536)))
    assert native_size(1920, 1080, support) == (1536, 1024)
    assert native_size(900, 1800, support) == (1024, 1536)
    assert native_size(500, 500, support) == (1024, 1024)


def test_presets_parse_from_config_strings():
    support = SizeSupport.model_validate({"presets": ["1024x1024", "1536x1024"]})
    assert support.presets == ((1024, 1024), (1536, 1024))


def plan_of(
    planner: SizePlanner, capabilities: Capabilities, size: str | None, **extras: object
) -> SizePlan:
    return planner.plan(
        size=size, aspect_ratio=None, resolution=None, extras=extras, capabilities=capabilities
    )


def test_planner_keeps_each_model_plan_apart():
    """The same ask on two models: each gets its own model's nearest size, asked in any order."""
    presets = Capabilities(sizes=SizeSupport(presets=((1024, 1024), (1536, 1024))))
    planner = SizePlanner(LIMITS)
    for _ in range(2):  # the second round answers from what the first kept
        on_bfl = plan_of(planner, Capabilities(sizes=BFL), "1920x1080")
        on_presets = plan_of(planner, presets, "1920x1080")
        assert (on_bfl.target.width, on_bfl.target.height) == (1920, 1080)
        assert on_bfl.native == native_size(1920, 1080, BFL)
        assert on_presets.native == (1536, 1024)
    # Pixel fields are part of the ask: the same size text with them is another plan.
    exact = plan_of(planner, CAPS, None, width=640, height=480)
    assert (exact.target.width, exact.target.height) == (640, 480)
    assert plan_of(planner, CAPS, None).target.text == "1024x1024"


def test_planner_refuses_every_time_and_stays_bounded():
    planner = SizePlanner(LIMITS)
    for _ in range(2):
        with pytest.raises(InvalidRequest):
            plan_of(planner, CAPS, "20000x20000")
    # A padded size is valid and resolved, but too long a key to be kept.
    padded = " " * 500 + "512x512"
    assert plan_of(planner, CAPS, padded).target.text == "512x512"
    assert len(planner._plans) == 0
    for side in range(1, SizePlanner.MAX_PLANS + 50):
        assert plan_of(planner, CAPS, f"{side}x{side}").target.width == side
    assert len(planner._plans) <= SizePlanner.MAX_PLANS
