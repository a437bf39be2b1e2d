"""Every metric the gateway exports, defined in one place, in Prometheus' text format.

Names follow Prometheus' conventions (``flux_proxy_`` prefix, base units as
suffixes, ``_total`` on counters); labels borrow OpenTelemetry's GenAI and HTTP
attribute names where one fits (``gen_ai_operation_name="image_generation"``,
``gen_ai_request_model``, ``gen_ai_provider_name``, ``http_route``,
``http_response_status_code``). Every label value is bounded: routes and
statuses are the gateway's own, models and providers come from its config, and a
model the config lacks is counted as ``unknown``, never under the client's text.

Adding a metric is one entry in :class:`Metrics`, as the circuit breakers' are
(``circuit_state``, ``circuit_skips``, fed by :class:`BreakerMetrics`).

The series every request changes, on the event loop's thread, are plain numbers
(flux_proxy.loop_metrics) rendered when scraped; the rest, changed from image
worker threads or seldom, are prometheus_client's own.

Under ``flux-proxy serve --workers N`` every worker writes its values to files in
the directory ``PROMETHEUS_MULTIPROC_DIR`` names (the CLI makes one per run), and
``/metrics``, whichever worker answers it, adds up all of them. There every metric
is prometheus_client's own, since only its values reach those files.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar
from urllib.parse import urlsplit

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.multiprocess import MultiProcessCollector

from flux_proxy.breaker import BreakerState, UpstreamId
from flux_proxy.loop_metrics import LoopCounter, LoopGauge, LoopHistogram

MULTIPROCESS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"
CONTENT_TYPE = CONTENT_TYPE_LATEST
IMAGE_GENERATION = "image_generation"  # OpenTelemetry's gen_ai.operation.name for this

# Image generation takes seconds to minutes; the gateway's own share, milliseconds.
UPSTREAM_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320)
OVERHEAD_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
IMAGE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
FANOUT_BUCKETS = (1, 2, 3, 4, 6, 8, 10, 16)

ROUTE_LABELS = ("http_route",)
REQUEST_LABELS = (
    "http_route",
    "http_response_status_code",
    "gen_ai_operation_name",
    "gen_ai_request_model",
    "gen_ai_provider_name",
)
MODEL_LABELS = ("gen_ai_request_model", "response_format")


# An upstream as its circuit breaker knows it (flux_proxy.breaker.UpstreamId), from config.
CIRCUIT_LABELS = ("gen_ai_provider_name", "upstream_model", "server_address")
CIRCUIT_LEVELS = {BreakerState.CLOSED: 0, BreakerState.HALF_OPEN: 1, BreakerState.OPEN: 2}


class CounterSeries(Protocol):
    def inc(self, amount: float = 1) -> None: ...


class GaugeSeries(Protocol):
    def inc(self, amount: float = 1) -> None: ...

    def dec(self, amount: float = 1) -> None: ...


class HistogramSeries(Protocol):
    def observe(self, amount: float) -> None: ...


S_co = TypeVar("S_co", CounterSeries, GaugeSeries, HistogramSeries, covariant=True)
S = TypeVar("S", CounterSeries, GaugeSeries, HistogramSeries)


class Labelled(Protocol[S_co]):
    """A labelled metric, prometheus_client's or a loop_metrics one: ``labels()`` gives a series."""

    def labels(self, *values: str) -> S_co: ...


class Children(Generic[S]):
    """A labelled metric's children, each looked up once: prometheus_client's
    ``labels()`` checks and converts its values and takes a lock on every call, which
    per request adds up. Label values are bounded (see the module docstring), so the
    cache is too."""

    __slots__ = ("_cache", "_fixed", "_metric")
    _metric: Labelled[S]
    _fixed: tuple[str, ...]
    _cache: dict[tuple[str, ...], S]

    def __init__(self, metric: Labelled[S], *fixed: str) -> None:
        self._metric = metric
        self._fixed = fixed  # leading label values, the same for every child here
        self._cache = {}

    def __call__(self, *values: str) -> S:
        try:
            return self._cache[values]
        except KeyError:
            child: S = self._metric.labels(*self._fixed, *values)
            self._cache[values] = child
            return child


@dataclass(frozen=True, slots=True)
class StoreUsage:
    images: int
    bytes: int


class Metrics:
    """The metrics of one gateway, in a registry of its own (two gateways in one
    process, as in the tests, count apart, unless their values go to shared files)."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        environ = os.environ if environ is None else environ
        self._shared_dir = environ.get(MULTIPROCESS_DIR_ENV) or None
        self.registry = r = CollectorRegistry()
        if self._shared_dir is None:  # per-process figures mean little summed over workers
            ProcessCollector(registry=r)
            PlatformCollector(registry=r)
        self.requests = self._counter(
            "flux_proxy_requests",
            "Requests answered, by route, HTTP status, model asked for and provider that "
            "answered (or last failed)",
            REQUEST_LABELS,
        )
        self.request_seconds = self._histogram(
            "flux_proxy_request_duration_seconds",
            "Time from a request's arrival to its answer's last byte",
            ROUTE_LABELS,
            UPSTREAM_BUCKETS,
        )
        self.overhead_seconds = self._histogram(
            "flux_proxy_overhead_seconds",
            "The gateway's own time per request: its duration less the time during which "
            "at least one upstream exchange was under way",
            ROUTE_LABELS,
            OVERHEAD_BUCKETS,
        )
        self.in_flight = self._live_sum_gauge(
            "flux_proxy_requests_in_flight",
            "Requests being answered now",
            ROUTE_LABELS,
        )
        self.upstream_seconds = self._histogram(
            "flux_proxy_upstream_duration_seconds",
            "One HTTP exchange with an upstream, from sending to the answer's last byte",
            ("gen_ai_provider_name",),
            UPSTREAM_BUCKETS,
        )
        self.upstream_requests = self._counter(
            "flux_proxy_upstream_requests",
            "HTTP exchanges with upstreams, by provider and status ('error': no answer)",
            ("gen_ai_provider_name", "http_response_status_code"),
        )
        self.fanout_width = self._unlabelled_histogram(
            "flux_proxy_fanout_width",
            "Provider calls one image request was split into",
            FANOUT_BUCKETS,
        )
        # Observed from image worker threads: prometheus_client's locked values.
        self.image_seconds = Histogram(
            "flux_proxy_image_processing_seconds",
            "Pillow work per image: transcode (encoded as image_format) or resize "
            "(of an image_format image)",
            ("operation", "image_format"),
            buckets=IMAGE_BUCKETS,
            registry=r,
        )
        self.images = self._counter(
            "flux_proxy_images",
            "Images in successful generation answers",
            MODEL_LABELS,
        )
        self.image_bytes = self._counter(
            "flux_proxy_image_bytes",
            "Encoded bytes of the images counted in flux_proxy_images_total whose bytes "
            "passed through the gateway (an upstream URL passed on unread has none)",
            MODEL_LABELS,
        )
        self.store_images = Gauge(
            "flux_proxy_store_images",
            "Images held in the image store for hosted links",
            registry=r,
            multiprocess_mode="mostrecent",
        )
        self.circuit_state = Gauge(
            "flux_proxy_circuit_state",
            "Each upstream's circuit breaker: 0 closed, 1 half-open (one trial request "
            "probes it), 2 open (skipped without a call)",
            CIRCUIT_LABELS,
            registry=r,
            multiprocess_mode="livemax",
        )
        self.circuit_skips = Counter(
            "flux_proxy_circuit_skips",
            "Times a request skipped an upstream without calling it, its circuit being open "
            "(or half-open with its trial running)",
            CIRCUIT_LABELS,
            registry=r,
        )
        self.store_bytes = Gauge(
            "flux_proxy_store_bytes",
            "Bytes the image store holds: its files' sizes, or for the memory store what "
            "its entries cost in memory (as counted against store.max_bytes)",
            registry=r,
            multiprocess_mode="mostrecent",
        )

    # The metrics each request changes on the loop's thread: loop_metrics' plain numbers
    # in one process, prometheus_client's (which write the shared files) across workers.

    def _counter(self, name: str, doc: str, labels: Sequence[str]) -> Labelled[CounterSeries]:
        if self._shared_dir is not None:
            return Counter(name, doc, labels, registry=self.registry)
        return LoopCounter(name, doc, labels, registry=self.registry)

    def _live_sum_gauge(self, name: str, doc: str, labels: Sequence[str]) -> Labelled[GaugeSeries]:
        # Across workers, the sum of the live ones' values.
        if self._shared_dir is not None:
            return Gauge(name, doc, labels, registry=self.registry, multiprocess_mode="livesum")
        return LoopGauge(name, doc, labels, registry=self.registry)

    def _histogram(
        self, name: str, doc: str, labels: Sequence[str], buckets: Sequence[float]
    ) -> Labelled[HistogramSeries]:
        if self._shared_dir is not None:
            return Histogram(name, doc, labels, buckets=buckets, registry=self.registry)
        return LoopHistogram(name, doc, labels, buckets=buckets, registry=self.registry)

    def _unlabelled_histogram(
        self, name: str, doc: str, buckets: Sequence[float]
    ) -> HistogramSeries:
        # prometheus_client's unlabelled metric is its own series (its labels() refuses).
        if self._shared_dir is not None:
            return Histogram(name, doc, buckets=buckets, registry=self.registry)
        return LoopHistogram(name, doc, (), buckets=buckets, registry=self.registry).labels()

    def render(self, store: StoreUsage | None) -> bytes:
        """The text exposition, with the store's usage as of now (when it can tell)."""
        if store is not None:
            self.store_images.set(store.images)
            self.store_bytes.set(store.bytes)
        if self._shared_dir is None:
            return generate_latest(self.registry)
        every_worker = CollectorRegistry()
        MultiProcessCollector(every_worker, path=self._shared_dir)  # type: ignore[no-untyped-call]
        return generate_latest(every_worker)


class BreakerMetrics:
    """The circuit breakers' changes and skips as metrics (a ``BreakerListener``)."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def state_changed(self, upstream: UpstreamId, state: BreakerState) -> None:
        self._metrics.circuit_state.labels(*_circuit_labels(upstream)).set(CIRCUIT_LEVELS[state])

    def skipped(self, upstream: UpstreamId) -> None:
        self._metrics.circuit_skips.labels(*_circuit_labels(upstream)).inc()


def _circuit_labels(upstream: UpstreamId) -> tuple[str, str, str]:
    # The base URL's host (and port), or "default" for the provider's own.
    address = urlsplit(upstream.base_url).netloc or "default"
    return upstream.provider, upstream.upstream_model, address
