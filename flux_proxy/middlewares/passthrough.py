"""Unknown-parameter passthrough: fields the gateway does not know go to the provider.

The job already carries the client's unknown fields in order; this layer applies
the provider's field rules (renames, type conversions, ranges) and reports what
happened to each field.
"""

from __future__ import annotations

from typing import Any

from flux_proxy.fields import convert, describe
from flux_proxy.pipeline import CallNext, Layer, derive
from flux_proxy.schema import ImageJob, ImageResult


class PassthroughMiddleware(Layer):
    effects = frozenset({"shapes_body"})
    forwards_unknown_fields = True

    def check(self, job: ImageJob) -> None:
        rules = job.target.capabilities.fields
        for param, value in job.fields.items():
            convert(param, value, rules.get(param))

    async def __call__(self, job: ImageJob, call_next: CallNext) -> ImageResult:
        if not job.fields:  # nothing to shape: the job goes on as it is
            return await call_next(job)
        rules = job.target.capabilities.fields
        provider = job.target.provider.name
        fields: dict[str, Any] = {}
        for param, value in job.fields.items():
            name, native = convert(param, value, rules.get(param))
            fields[name] = native
            handling, detail = describe(param, value, name, native)
            job.report.record(param, handling, f"{detail} to {provider}")
        return await call_next(derive(job, fields=fields))
