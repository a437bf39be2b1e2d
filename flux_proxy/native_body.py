"""A provider's request body, built from a job: field rules applied, the report kept.

``NativeBody`` sends the public parameters a provider takes under its own names
and types (``Capabilities.fields``); the helpers say in the report how the size
reached the provider and name the public parameter an upstream error points at.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from flux_proxy.fields import convert, describe
from flux_proxy.schema import ImageJob


class NativeBody:
    """Builds a provider's request body, applying field rules and recording the report."""

    def __init__(self, job: ImageJob) -> None:
        self._job = job
        self.body: dict[str, Any] = {}
        # Body field -> the public parameter the gateway filled it from.
        self._sources: dict[str, str] = {}

    def put(self, param: str, value: Any) -> None:
        capabilities = self._job.target.capabilities
        if not capabilities.accepts(param):
            # Not sent, so any earlier note about it (fan-out's seed + i) is void.
            self._job.report.record(param, "ignored", f"this upstream does not accept {param}")
            return
        rule = capabilities.fields.get(param)
        name, native = convert(param, value, rule)
        self.body[name] = native
        self._sources[name] = param
        if client_sent(self._job, param):  # else the gateway's own choice: nothing to report
            self._job.report.suggest(param, *describe(param, value, name, native))

    def put_size(self, form: str, **fields: Any) -> None:
        """The size in the provider's own fields (``form`` says how, for the report)."""
        self.body.update(fields)
        self._sources.update(dict.fromkeys(fields, "size"))
        report_size_form(self._job, form)

    def put_fields(self, skip: Collection[str] = ()) -> None:
        """The passthrough fields (already converted by the passthrough layer), but
        ``skip``. A client field the gateway already set from a public parameter
        (a client's own ``width`` beside ``size``) loses, and the report says so."""
        for name, value in self._job.fields.items():
            if name in skip:
                continue
            if name not in self.body:
                self.body[name] = value
            elif self.body[name] != value:
                source = self._sources.get(name)
                why = f"from {source}" if source else "itself"
                self._job.report.record(name, "ignored", f"the gateway sets {name} {why}")


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
    for param in SIZE_PARAMS:
        if client_sent(job, param) and getattr(job.request, param) is not None:
            job.report.sent_as(param, form)


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
        for public, rule in job.target.capabilities.fields.items()
        if (rule.name or public) == native
    ]
    sent_names = set(request.model_fields_set) | set(request.extras)
    return next((p for p in candidates if p in sent_names), candidates[0] if candidates else native)
