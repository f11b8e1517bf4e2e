"""Prometheus metrics: what the engine knows (read at scrape time) plus request histograms."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from tunnelvision.logs import dropped_lines

STAGES = ("decode", "prepare", "queue", "device", "finish", "total")
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
SCHEDULER_COUNTERS = (
    "submitted",
    "executed",
    "failed",
    "rejected",
    "dropped_expired",
    "dropped_cancelled",
    "dropped_shutdown",
    "batch_retries_single",
    "batch_splits_oom",
    "affinity_kept",  # a reused image ran on the device that holds its embedding
    "affinity_moved",  # ... or on another, its own being busy while that one was idle
)


class Metrics:
    def __init__(self, engine_stats: Callable[[], dict[str, Any]]) -> None:
        self.registry = CollectorRegistry()
        self.queue_wait = Histogram(
            "tunnelvision_queue_wait_seconds",
            "Time from submit to device start",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "tunnelvision_batch_size",
            "Requests per device pass",
            buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64),
            registry=self.registry,
        )
        self.batch_seconds = Histogram(
            "tunnelvision_batch_device_seconds",
            "Device time per pass",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.stage_seconds = Histogram(
            "tunnelvision_stage_seconds",
            "Per-request time by stage",
            ["stage"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.requests = Counter(
            "tunnelvision_requests",
            "HTTP requests by route and status",
            ["route", "status"],
            registry=self.registry,
        )
        self.registry.register(EngineCollector(engine_stats))
        self.registry.register(LogCollector())

    def on_batch(self, size: int, device_s: float, queue_waits: list[float]) -> None:
        """The scheduler's observer (called from the device worker)."""
        self.batch_size.observe(size)
        self.batch_seconds.observe(device_s)
        for wait in queue_waits:
            self.queue_wait.observe(wait)

    def on_request(self, route: str, status: int, timings_ms: dict[str, float]) -> None:
        self.requests.labels(route=route, status=str(status)).inc()
        for stage in STAGES:
            if stage in timings_ms:
                self.stage_seconds.labels(stage=stage).observe(timings_ms[stage] / 1000)


class EngineCollector(Collector):
    """Gauges and counters read from `stats()` at each scrape, so they never go stale."""

    def __init__(self, engine_stats: Callable[[], dict[str, Any]]) -> None:
        self.engine_stats = engine_stats

    def collect(self) -> Iterator[Any]:
        stats = self.engine_stats()
        queue = stats.get("queue", {})
        yield _gauge("tunnelvision_queue_depth", "Requests waiting for the device", queue.get("queued", 0))
        yield _gauge("tunnelvision_running", "Requests on the device", queue.get("running", 0))
        yield _gauge("tunnelvision_workers_alive", "Device workers alive", queue.get("workers_alive", 0))
        yield _gauge("tunnelvision_ready", "1 when serving", int(stats.get("ready", False)))
        tasks = CounterMetricFamily("tunnelvision_tasks", "Scheduler task outcomes", labels=["outcome"])
        for name in SCHEDULER_COUNTERS:
            tasks.add_metric([name], queue.get(name, 0))
        yield tasks
        oom = queue.get("failed_by_code", {}).get("device_out_of_memory", 0) + queue.get(
            "batch_splits_oom", 0
        )
        yield CounterMetricFamily("tunnelvision_device_oom", "Device out-of-memory events", value=oom)
        yield from _cache_metrics(stats.get("caches", {}))
        yield from _replica_cache_metrics(stats.get("replicas", {}))
        memory = GaugeMetricFamily(
            "tunnelvision_device_memory_bytes", "Device memory allocated", labels=["device"]
        )
        for device, allocated in stats.get("device_memory", {}).items():
            memory.add_metric([device], allocated)
        yield memory


class LogCollector(Collector):
    """Log lines lost because the log sink was slower than the traffic (see logs.py)."""

    def collect(self) -> Iterator[Any]:
        yield CounterMetricFamily(
            "tunnelvision_log_lines_dropped",
            "Log lines dropped: the log sink was too slow",
            value=dropped_lines(),
        )


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


def _replica_cache_metrics(replicas: dict[str, dict[str, Any]]) -> Iterator[Any]:
    """Ray mode: embedding cache hits and misses per replica (the totals are the cache metrics)."""
    hits = CounterMetricFamily(
        "tunnelvision_replica_cache_hits", "Embedding cache hits per Ray replica", labels=["replica"]
    )
    misses = CounterMetricFamily(
        "tunnelvision_replica_cache_misses", "Embedding cache misses per Ray replica", labels=["replica"]
    )
    for replica, numbers in replicas.items():
        cache = numbers.get("cache") or {}
        hits.add_metric([replica], cache.get("hits", 0))
        misses.add_metric([replica], cache.get("misses", 0))
    yield from (hits, misses)


def _cache_metrics(caches: dict[str, dict[str, int]]) -> Iterator[Any]:
    hits = CounterMetricFamily("tunnelvision_cache_hits", "Cache hits", labels=["cache"])
    misses = CounterMetricFamily("tunnelvision_cache_misses", "Cache misses", labels=["cache"])
    size = GaugeMetricFamily("tunnelvision_cache_bytes", "Bytes held", labels=["cache"])
    for name, stats in caches.items():
        hits.add_metric([name], stats.get("hits", 0))
        misses.add_metric([name], stats.get("misses", 0))
        size.add_metric([name], stats.get("bytes", 0))
    yield from (hits, misses, size)
