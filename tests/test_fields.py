"""Provider field rules: renames, type conversions, value maps, ranges."""

from __future__ import annotations

import pytest

from flux_proxy.errors import InvalidRequest
from flux_proxy.fields import FieldRule, convert, describe


def test_no_rule_is_passthrough():
    assert convert("anything", {"a": [1]}, None) == ("anything", {"a": [1]})
    assert describe("x", 1, "x", 1) == ("passthrough", "sent unchanged")


def test_rename_shorthand():
    rule = FieldRule.model_validate("output_quality")
    assert convert("output_compression", 80, rule) == ("output_quality", 80)
    assert describe("output_compression", 80, "output_quality", 80)[0] == "renamed"


@pytest.mark.parametrize(
    ("kind", "value", "expected"),
    [
        ("string", 2, "2"),
        ("string", 2.0, "2"),
        ("string", True, "true"),
        ("integer", "3", 3),
        ("integer", 3.0, 3),
        ("number", "0.5", 0.5),
        ("boolean", "true", True),
    ],
)
def test_type_conversion(kind, value, expected):
    name, native = convert("f", value, FieldRule(type=kind))
    assert (name, native) == ("f", expected)
    assert type(native) is type(expected)
    assert describe("f", value, name, native)[0] == "converted"


@pytest.mark.parametrize(
    ("kind", "value"),
    [
        ("integer", "abc"),
        ("integer", 2.5),
        ("integer", True),
        ("boolean", "yes"),
        ("number", "nan"),
        ("string", None),
    ],
)
def test_impossible_conversion_is_400_naming_the_field(kind, value):
    with pytest.raises(InvalidRequest) as caught:
        convert("safety_tolerance", value, FieldRule(type=kind))
    assert caught.value.param == "safety_tolerance"


def test_value_map_then_range():
    rule = FieldRule(name="output_format", values={"jpeg": "jpg"})
    assert convert("output_format", "jpeg", rule) == ("output_format", "jpg")
    assert convert("output_format", "png", rule) == ("output_format", "png")
    tolerance = FieldRule(type="integer", minimum=1, maximum=6)
    assert convert("safety_tolerance", "6", tolerance) == ("safety_tolerance", 6)
    for bad in (0, 7, "9"):
        with pytest.raises(InvalidRequest, match="1 to 6"):
            convert("safety_tolerance", bad, tolerance)
