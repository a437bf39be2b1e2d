"""Counters, gauges and histograms changed only on the event loop's thread: plain numbers.

prometheus_client's values take a lock on every change, and its ``inc`` and
``observe`` check their arguments and the metric in Python first: about 6,000 to
10,000 instructions a change, a few percent of a url pass-through's CPU with the
nine changes each request makes. A series changed from one thread needs no lock,
so these keep a float (a histogram, a float and a list of counts, its bucket found
by bisection) and hand them to prometheus_client only when ``/metrics`` is
scraped, as a collector: the exposition (names, HELP, TYPE, labels, ``le``
bounds, ``_created``) is what prometheus_client's own metric of that kind and
name would write, which tests/test_metrics.py checks against prometheus_client.

Only for values changed on the loop's thread: a value changed from worker threads
(flux_proxy.imaging's) keeps prometheus_client's locked one. Nor do these reach
the files ``flux-proxy serve --workers N`` shares; metrics.py picks
prometheus_client's own kinds there.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Iterable, Sequence
from typing import Generic, TypeVar

from prometheus_client import metrics as client_metrics
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import CollectorRegistry
from prometheus_client.utils import INF, floatToGoString


def _created_series() -> bool:
    # prometheus_client's switch (PROMETHEUS_DISABLE_CREATED_SERIES, or
    # disable_created_metrics()), read when scraped as its own metrics read it.
    return bool(getattr(client_metrics, "_use_created", True))


class CounterValue:
    __slots__ = ("created", "value")

    def __init__(self) -> None:
        self.value = 0.0
        self.created = time.time()

    def inc(self, amount: float = 1) -> None:
        if amount < 0:
            raise ValueError("Counters can only be incremented by non-negative amounts.")
        self.value += amount


class GaugeValue:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1) -> None:
        self.value += amount

    def dec(self, amount: float = 1) -> None:
        self.value -= amount


class HistogramValue:
    """Counts per bucket (each its own range, summed upwards when scraped), and the sum."""

    __slots__ = ("_bounds", "counts", "created", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self._bounds = bounds
        self.counts = [0.0] * len(bounds)
        self.sum = 0.0
        self.created = time.time()

    def observe(self, amount: float) -> None:
        """Count ``amount`` (a number, not NaN) in the first bucket it is at most."""
        self.sum += amount
        self.counts[bisect_left(self._bounds, amount)] += 1


V = TypeVar("V", CounterValue, GaugeValue, HistogramValue)
F = TypeVar("F", CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily)


class _LoopMetric(Generic[V, F]):
    """One metric family: its series by label values, each made on first use. A kind
    names the family it renders as; its series' own values go in by ``_add``."""

    _kind: type[F]

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        *,
        registry: CollectorRegistry,
    ) -> None:
        self._name = name
        self._documentation = documentation
        self._labelnames = tuple(labelnames)
        self._series: dict[tuple[str, ...], V] = {}
        if not self._labelnames:  # as prometheus_client's: its one series from the start
            self.labels()
        registry.register(self)

    def labels(self, *values: str) -> V:
        series = self._series.get(values)
        if series is None:
            if len(values) != len(self._labelnames):
                raise ValueError(f"{self._name} takes labels {self._labelnames}, not {values}")
            series = self._series[values] = self._new_series()
        return series

    def describe(self) -> Iterable[Metric]:
        return [self._family()]

    def collect(self) -> Iterable[Metric]:
        family = self._family()
        created = _created_series()
        for values, series in list(self._series.items()):
            self._add(family, values, series, created)
        return [family]

    def _new_series(self) -> V:
        raise NotImplementedError

    def _family(self) -> F:
        return self._kind(self._name, self._documentation, labels=self._labelnames)

    def _add(self, family: F, values: tuple[str, ...], series: V, created: bool) -> None:
        raise NotImplementedError


class LoopCounter(_LoopMetric[CounterValue, CounterMetricFamily]):
    _kind = CounterMetricFamily

    def _new_series(self) -> CounterValue:
        return CounterValue()

    def _add(
        self,
        family: CounterMetricFamily,
        values: tuple[str, ...],
        series: CounterValue,
        created: bool,
    ) -> None:
        family.add_metric(values, series.value, created=series.created if created else None)


class LoopGauge(_LoopMetric[GaugeValue, GaugeMetricFamily]):
    _kind = GaugeMetricFamily

    def _new_series(self) -> GaugeValue:
        return GaugeValue()

    def _add(
        self, family: GaugeMetricFamily, values: tuple[str, ...], series: GaugeValue, created: bool
    ) -> None:
        family.add_metric(values, series.value)


class LoopHistogram(_LoopMetric[HistogramValue, HistogramMetricFamily]):
    _kind = HistogramMetricFamily

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        *,
        buckets: Sequence[float],
        registry: CollectorRegistry,
    ) -> None:
        bounds = [float(bound) for bound in buckets]
        # Non-negative: prometheus_client's histogram leaves _sum out below zero, which
        # these need not copy (they count durations and widths).
        if not bounds or bounds != sorted(bounds) or bounds[0] < 0:
            raise ValueError(f"{name}: buckets must be non-negative and in order")
        if bounds[-1] != INF:
            bounds.append(INF)
        self._bounds = tuple(bounds)
        self._le = [floatToGoString(bound) for bound in bounds]  # type: ignore[no-untyped-call]
        super().__init__(name, documentation, labelnames, registry=registry)

    def _new_series(self) -> HistogramValue:
        return HistogramValue(self._bounds)

    def _add(
        self,
        family: HistogramMetricFamily,
        values: tuple[str, ...],
        series: HistogramValue,
        created: bool,
    ) -> None:
        running = 0.0
        buckets: list[tuple[str, float]] = []
        for le, count in zip(self._le, series.counts, strict=True):
            running += count  # each bucket counts only its own range until here
            buckets.append((le, running))
        family.add_metric(values, buckets, series.sum)
        if created:
            labels = dict(zip(self._labelnames, values, strict=True))
            family.add_sample(f"{self._name}_created", labels, series.created)
