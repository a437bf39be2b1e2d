"""Unknown-parameter passthrough: fields the gateway does not know go to the provider.

The job already carries the client's unknown fields in order; this layer applies
the renames the provider declares and reports what happened to each field.
"""

from __future__ import annotations

from dataclasses import replace

from flux_proxy.pipeline import CallNext
from flux_proxy.runtime import Runtime
from flux_proxy.schema import ImageJob, ImageResult


class PassthroughMiddleware:
    def __init__(self, runtime: Runtime) -> None:
        del runtime  # nothing to configure; the signature is every middleware's

    async def __call__(self, job: ImageJob, call_next: CallNext) -> ImageResult:
        renames = job.route.capabilities.renames
        provider = job.route.provider.name
        fields = {}
        for name, value in job.fields.items():
            native = renames.get(name, name)
            fields[native] = value
            if native == name:
                job.report.record(name, "passthrough", f"sent to {provider} unchanged")
            else:
                job.report.record(name, "renamed", f"sent to {provider} as {native}")
        return await call_next(replace(job, fields=fields))
