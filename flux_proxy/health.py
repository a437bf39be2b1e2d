"""Liveness, readiness and metrics: what a load balancer, Kubernetes or Prometheus asks.

``/healthz`` answers 200 whenever the process serves requests at all: a failing
liveness probe means "restart me". ``/readyz`` answers 200 only while this gateway
should get traffic: its config loaded (a gateway exists only once its settings
validated), its image store reachable, and no shutdown under way. Neither calls a
provider: probes come every few seconds, and a provider outage must not take every
replica out of the load balancer (requests then get the provider's error instead).
``/metrics`` is Prometheus' text exposition (flux_proxy/metrics.py); like the probes
it needs no client key, so operators keep it to their network (a NetworkPolicy).
"""

from __future__ import annotations

import logging

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from flux_proxy.metrics import CONTENT_TYPE, Metrics, StoreUsage
from flux_proxy.store import ImageStore, MeasuredStore

logger = logging.getLogger("flux_proxy")

OK = "ok"
# A probe's answer describes this instant; no cache may keep it.
_NO_STORE = {"Cache-Control": "no-store"}


class Health:
    """The probe answers of one gateway, and whether its lifespan is shutting down."""

    def __init__(self, store: ImageStore, metrics: Metrics) -> None:
        self._store = store
        self._metrics = metrics
        self._shutting_down = False

    def started(self) -> None:
        # A host app whose lifespan runs again (a test client per test) is ready again.
        self._shutting_down = False

    def stopping(self) -> None:
        self._shutting_down = True

    async def live(self, request: Request) -> Response:
        return JSONResponse({"status": OK}, headers=_NO_STORE)

    async def ready(self, request: Request) -> Response:
        checks = {
            "config": OK,
            "store": await self._store_check(),
            "lifecycle": "shutting down" if self._shutting_down else OK,
        }
        ready = all(outcome == OK for outcome in checks.values())
        return JSONResponse(
            {"status": "ready" if ready else "not ready", "checks": checks},
            status_code=200 if ready else 503,
            headers=_NO_STORE,
        )

    async def metrics(self, request: Request) -> Response:
        return Response(
            self._metrics.render(await self._store_usage()),
            media_type=CONTENT_TYPE,
            headers=_NO_STORE,
        )

    async def _store_usage(self) -> StoreUsage | None:
        if not isinstance(self._store, MeasuredStore):
            return None
        try:
            return await self._store.usage()
        except OSError:  # the store's trouble is /readyz's to report; the rest still counts
            return None

    async def _store_check(self) -> str:
        try:
            problem = await self._store.problem()
        except Exception:  # a backend's own failure is "not ready", not a 500
            logger.exception("readiness: the image store check failed")
            return "the image store check failed"
        return problem or OK
