"""Provider field rules: the provider's name, type and range for one public field.

A provider declares these as data in ``Capabilities.fields``; the passthrough
layer applies them to fields the gateway does not interpret, and providers apply
them to the public parameters they send (``NativeBody``). Either way the report
records the real handling: unchanged, renamed, or converted.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, model_validator

from flux_proxy.errors import InvalidRequest

if TYPE_CHECKING:
    from flux_proxy.schema import Handling, ImageJob

FieldType = Literal["integer", "number", "string", "boolean"]


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


class NativeBody:
    """Builds a provider's request body, applying field rules and recording the report."""

    def __init__(self, job: ImageJob) -> None:
        self._job = job
        self.body: dict[str, Any] = {}

    def put(self, param: str, value: Any) -> None:
        capabilities = self._job.route.capabilities
        if not capabilities.accepts(param):
            # Not sent, so any earlier note about it (fan-out's seed + i) is void.
            self._job.report.record(param, "ignored", f"this upstream does not accept {param}")
            return
        rule = capabilities.fields.get(param)
        name, native = convert(param, value, rule)
        self.body[name] = native
        handling, detail = describe(param, value, name, native)
        existing = self._job.report.get(param)
        if existing is None and not client_sent(self._job, param):
            return  # the gateway's own choice (a default format, say): nothing to report
        # A middleware's emulation note is worth more than "sent unchanged".
        if existing is None or (existing.handling == "passthrough" and handling != "passthrough"):
            self._job.report.record(param, handling, detail)

    def put_fields(self) -> None:
        """The passthrough fields, already converted by the passthrough layer."""
        for name, value in self._job.fields.items():
            self.body.setdefault(name, value)


# The public parameters that set an image's size.
SIZE_PARAMS = ("size", "aspect_ratio", "resolution")


def client_sent(job: ImageJob, param: str) -> bool:
    """Whether the client's request named ``param`` (the report covers only those)."""
    request = job.request
    return param in request.model_fields_set or param in request.extras


def report_size_form(job: ImageJob, form: str) -> None:
    """Say in the report how the size reached the provider (``form``: its native form).

    Each size parameter the client sent (and the gateway did not ignore) becomes
    "converted" (or stays "emulated" when the gateway resizes), with ``sent as
    {form}`` in front of what the size layer said. Idempotent: fan-out's calls
    share one report, and the detail is said once, not once per call.
    """
    sent_as = f"sent as {form}"
    for param in SIZE_PARAMS:
        if not client_sent(job, param) or getattr(job.request, param) is None:
            continue
        entry = job.report.get(param)
        if entry is None:
            job.report.record(param, "converted", sent_as)
            continue
        if entry.handling == "ignored" or entry.detail.startswith(sent_as):
            continue
        if entry.handling == "passthrough":
            # "1024x768" went out in the provider's own form (width/height, a preset
            # name): converted, and the form says all the passthrough note did.
            job.report.record(param, "converted", sent_as)
        else:
            handling: Handling = "emulated" if entry.handling == "emulated" else "converted"
            job.report.record(param, handling, f"{sent_as}; {entry.detail}")


def public_param(job: ImageJob, native: str, *, size_fields: frozenset[str]) -> str:
    """The client's name for a provider field an upstream error points at.

    A size field names whichever size parameter the client sent; a field renamed
    by ``Capabilities.fields`` names its public field (preferring one the client
    sent); anything else was sent under its own name.
    """
    request = job.request
    if native in size_fields:
        sent = request.model_fields_set
        return next((p for p in SIZE_PARAMS if p in sent and getattr(request, p)), "size")
    candidates = [
        public
        for public, rule in job.route.capabilities.fields.items()
        if (rule.name or public) == native
    ]
    sent_names = set(request.model_fields_set) | set(request.extras)
    return next((p for p in candidates if p in sent_names), candidates[0] if candidates else native)


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
