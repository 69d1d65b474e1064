"""Prometheus metrics of one replica, in a registry of its own (one per app)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class _PoolCollector(Collector):
    def __init__(self, stats: Callable[[], tuple[int, int]]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        size, in_use = self._stats()
        yield GaugeMetricFamily(
            "varstack_db_pool_connections", "Connections the pool holds open.", value=size
        )
        yield GaugeMetricFamily(
            "varstack_db_pool_in_use", "Pool connections lent to a request.", value=in_use
        )


class _ReadBatchCollector(Collector):
    def __init__(self, stats: Callable[[], tuple[int, int, int]]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        batches, reads, waiting = self._stats()
        yield CounterMetricFamily(
            "varstack_db_read_batches",
            "Statements that read, at once, the keys of the GETs that waited together.",
            value=batches,
        )
        yield CounterMetricFamily(
            "varstack_db_batched_reads", "GETs answered by a batched read.", value=reads
        )
        yield GaugeMetricFamily(
            "varstack_db_reads_waiting", "GETs waiting in batches for a connection.",
            value=waiting,
        )


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._requests = Counter(
            "varstack_http_requests", "HTTP requests answered.",
            ["method", "route", "status"], registry=self.registry,
        )
        self._latency = Histogram(
            "varstack_http_request_duration_seconds", "Time to answer a request.",
            ["route"], buckets=LATENCY_BUCKETS, registry=self.registry,
        )
        self._db_errors = Counter(
            "varstack_db_errors", "Database errors met by requests, by kind.",
            ["kind"], registry=self.registry,
        )
        # Label children cached: labels() costs a lock and a dict lookup per call.
        self._request_children: dict[tuple[str, str, int], Counter] = {}
        self._latency_children: dict[str, Histogram] = {}

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        key = (method, route, status)
        counter = self._request_children.get(key)
        if counter is None:
            counter = self._requests.labels(method, route, str(status))
            self._request_children[key] = counter
        counter.inc()
        histogram = self._latency_children.get(route)
        if histogram is None:
            histogram = self._latency_children[route] = self._latency.labels(route)
        histogram.observe(seconds)

    def database_error(self, kind: str) -> None:
        self._db_errors.labels(kind).inc()

    def watch_pool(self, stats: Callable[[], tuple[int, int]]) -> None:
        self.registry.register(_PoolCollector(stats))

    def watch_read_batches(self, stats: Callable[[], tuple[int, int, int]]) -> None:
        self.registry.register(_ReadBatchCollector(stats))

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
