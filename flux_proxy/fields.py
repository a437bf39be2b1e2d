"""Provider field rules: the provider's name, type and range for one public field.

A provider declares these as data in ``Capabilities.fields``; the passthrough
layer applies them to fields the gateway does not interpret, and providers apply
them to the public parameters they send (``flux_proxy.native_body``). Either way
the report records the real handling: unchanged, renamed, or converted.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, model_validator

from flux_proxy.errors import InvalidRequest

FieldType = Literal["integer", "number", "string", "boolean"]
# How the gateway carried out one parameter, as the report says it.
Handling = Literal["passthrough", "renamed", "converted", "emulated", "ignored"]


class FieldRule(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str | None = None  # the provider's field name; None: the same
    type: FieldType | None = None  # convert the value to this JSON type
    values: dict[str, Any] = {}  # value renames, e.g. {"jpeg": "jpg"}
    minimum: float | None = None  # the provider's accepted range (checked before the call)
    maximum: float | None = None

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        # `fields: {output_compression: output_quality}` is a plain rename.
        return {"name": data} if isinstance(data, str) else data


def convert(param: str, value: Any, rule: FieldRule | None) -> tuple[str, Any]:
    """The provider's (name, value) for ``param``; 400 naming ``param`` if it cannot be."""
    if rule is None:
        return param, value
    native = value
    if isinstance(value, str) and value in rule.values:
        native = rule.values[value]
    if rule.type is not None:
        native = _as_type(param, native, rule.type)
    if rule.minimum is not None or rule.maximum is not None:
        _check_range(param, native, rule)
    return rule.name or param, native


def describe(param: str, value: Any, native_name: str, native_value: Any) -> tuple[Handling, str]:
    if native_name == param and native_value == value and type(native_value) is type(value):
        return "passthrough", "sent unchanged"
    if native_value == value and type(native_value) is type(value):
        return "renamed", f"sent as {native_name}"
    return "converted", f"sent as {native_name}={_short(native_value)}"


def _as_type(param: str, value: Any, kind: FieldType) -> Any:
    try:
        if kind == "string":
            if isinstance(value, bool):
                return "true" if value else "false"
            if isinstance(value, float) and value.is_integer():
                return str(int(value))
            if isinstance(value, int | float | str):
                return str(value)
        elif kind == "integer":
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, int):
                return value
            number = float(value)
            if number.is_integer():
                return int(number)
        elif kind == "number":
            if not isinstance(value, bool):
                number = float(value)
                if math.isfinite(number):
                    return number
        elif kind == "boolean":
            if isinstance(value, bool):
                return value
            if value in ("true", "false"):
                return value == "true"
    except (TypeError, ValueError, OverflowError):
        pass
    raise InvalidRequest(
        f"Invalid value for '{param}': this model's provider needs a {kind}, got {_short(value)}.",
        param=param,
    )


def _check_range(param: str, value: Any, rule: FieldRule) -> None:
    try:
        number = float(value)
    except OverflowError:  # an integer too large for a float is out of any range
        number = math.inf if value > 0 else -math.inf
    except (TypeError, ValueError):
        raise InvalidRequest(
            f"Invalid value for '{param}': expected a number.", param=param
        ) from None
    low, high = rule.minimum, rule.maximum
    if (low is not None and number < low) or (high is not None and number > high):
        bounds = (
            f"{low:g} to {high:g}"
            if low is not None and high is not None
            else (f"at least {low:g}" if low is not None else f"at most {high:g}")
        )
        raise InvalidRequest(
            f"Invalid value for '{param}': this model's provider accepts {bounds}, got {value}.",
            param=param,
        )


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
