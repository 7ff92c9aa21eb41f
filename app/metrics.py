"""Prometheus metrics, in a registry per app (so several apps in one process do not clash).

Labels use only model names and versions that exist in the repository (``unknown`` for
anything a client made up), so a client cannot blow up the label cardinality.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from app.batcher import BatchStats
from app.errors import ServiceError
from app.registry import ModelRegistry, VersionEntry

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
QUEUE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
RATE_WINDOW_S = 10.0


def _prune(recent: deque[tuple[float, int]], now: float) -> None:
    while recent and recent[0][0] < now - RATE_WINDOW_S:
        recent.popleft()


@dataclass
class RequestLabels:
    """A request's labels, filled in as its model and version become known (module doc)."""

    model: str = "unknown"
    version: str = "none"


@contextmanager
def counted(requests: Counter, latency: Histogram) -> Iterator[RequestLabels]:
    """Count one request by model, version and final status; time it when it succeeded."""
    started = time.perf_counter()
    labels = RequestLabels()
    status = 500
    try:
        yield labels
        status = 200
    except ServiceError as exc:
        status = exc.status_code
        raise
    finally:
        requests.labels(labels.model, labels.version, str(status)).inc()
        if status == 200:
            latency.labels(labels.model, labels.version).observe(time.perf_counter() - started)


class Metrics:
    def __init__(self) -> None:
        disable_created_metrics()  # no *_created series: they only add noise to scrapes
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "waste_requests",
            "Prediction requests by model, version and HTTP status.",
            ["model", "version", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "waste_request_duration_seconds",
            "Prediction request latency (body read to response), by model and version.",
            ["model", "version"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.queue_wait = Histogram(
            "waste_queue_wait_seconds",
            "Time an image waited in the batcher's queue before its forward pass.",
            ["model", "version"],
            buckets=QUEUE_BUCKETS,
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "waste_batch_size",
            "Images per forward pass.",
            ["model", "version"],
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )
        self.batch_seconds = Histogram(
            "waste_batch_inference_seconds",
            "Duration of one batch on the inference thread (assembly, forward, top-k).",
            ["model", "version"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.images = Counter(
            "waste_images",
            "Images by outcome: predicted, or rejected (undecodable, too large, wrong type).",
            ["model", "version", "outcome"],
            registry=self.registry,
        )
        self.uncertain = Counter(
            "waste_uncertain_images",
            "Predicted images answered 'uncertain' (top probability below min_confidence).",
            ["model", "version"],
            registry=self.registry,
        )
        self.explain_requests = Counter(
            "waste_explain_requests",
            "Explanation requests by model, version and HTTP status.",
            ["model", "version", "status"],
            registry=self.registry,
        )
        self.explain_latency = Histogram(
            "waste_explain_duration_seconds",
            "Explanation request latency (body read to response), by model and version.",
            ["model", "version"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        # (monotonic end time, images) of recent batches, per (model, version)
        self._recent_by_version: dict[tuple[str, str], deque[tuple[float, int]]] = {}

    def observe_batch(self, entry: VersionEntry, stats: BatchStats) -> None:
        labels = (entry.name, str(entry.version))
        self.batch_size.labels(*labels).observe(stats.size)
        self.batch_seconds.labels(*labels).observe(stats.run_s)
        wait = self.queue_wait.labels(*labels)
        for seconds in stats.queue_waits_s:
            wait.observe(seconds)
        if stats.ok:
            now = time.monotonic()
            recent = self._recent_by_version.setdefault(labels, deque())
            recent.append((now, stats.size))
            _prune(recent, now)  # bounded even when nobody scrapes

    def images_per_second(self) -> dict[tuple[str, str], float]:
        now = time.monotonic()
        rates = {}
        for labels, recent in self._recent_by_version.items():
            _prune(recent, now)
            rates[labels] = sum(n for _, n in recent) / RATE_WINDOW_S
        return rates

    def install_state_collector(self, registry_getter: Callable[[], ModelRegistry | None]) -> None:
        self.registry.register(_StateCollector(self, registry_getter))


class _StateCollector(Collector):
    """Values read at scrape time: queue depth, version states, recent images per second."""

    def __init__(self, metrics: Metrics, registry_getter: Callable[[], ModelRegistry | None]):
        self.metrics = metrics
        self.registry_getter = registry_getter

    def collect(self) -> Iterator[Metric]:
        depth = GaugeMetricFamily(
            "waste_queue_depth",
            "Images waiting in a version's batcher queue.",
            labels=["model", "version"],
        )
        state = GaugeMetricFamily(
            "waste_model_version_state",
            "1 for the state each known version is in (available, loading, ready, failed).",
            labels=["model", "version", "state"],
        )
        rate = GaugeMetricFamily(
            "waste_images_per_second",
            f"Images predicted per second over the last {RATE_WINDOW_S:.0f} s.",
            labels=["model", "version"],
        )
        registry = self.registry_getter()
        if registry is not None:
            for name, model in sorted(registry.models.items()):
                for version, entry in sorted(model.versions.items()):
                    labels = [name, str(version)]
                    state.add_metric([*labels, entry.state.value], 1.0)
                    if entry.served is not None:
                        depth.add_metric(labels, float(entry.served.batcher.queue_depth))
        for (model_name, version_label), value in sorted(self.metrics.images_per_second().items()):
            rate.add_metric([model_name, version_label], value)
        yield depth
        yield state
        yield rate
