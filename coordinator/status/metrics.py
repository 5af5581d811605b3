"""Prometheus metrics of one coordinator process, served at ``/metrics``.

Each process has its own :class:`prometheus_client.CollectorRegistry` (several apps may share a test
process). Counters and histograms are fed as requests end; gauges are read from the pool's own
state when Prometheus scrapes, so nothing on the request path keeps them up to date.

A consumer names the model, and a hostile one could name a new model on every request: a model the
pool does not know (a 404) counts as ``other``, and so does every model past the first
``MODEL_LABELS`` (agents announce the rest, and an account may connect many).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine

from coordinator.money.requestlog import RequestRecord

MODEL_LABELS = 100
OTHER = "other"
# Seconds: from a fast local answer to a long generation.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


@dataclass(frozen=True)
class Gauges:
    """Where the gauges read the pool's state at scrape time."""

    agents: Callable[[], int]
    jobs: Callable[[], int]
    open_leases: Callable[[], int]
    flush_lag: Callable[[], float]
    request_backlog: Callable[[], int]
    redis_errors: Callable[[], int]
    redis_dropped: Callable[[], int] = lambda: 0  # messages to other replicas that never went out
    agents_elsewhere: Callable[[], int] = lambda: 0  # other replicas' agents in this one's mirror
    jobs_relayed: Callable[[], int] = lambda: 0  # jobs this process runs for other replicas' consumers
    views_computed: Callable[[], Mapping[str, int]] = dict  # public views recomputed, by view


class _StateCollector(Collector):
    def __init__(self, gauges: Gauges) -> None:
        self.gauges = gauges

    def collect(self) -> Iterator[Metric]:
        g = self.gauges
        yield GaugeMetricFamily("pool_agents_connected", "Agents connected to this process.", g.agents())
        yield GaugeMetricFamily("pool_jobs_in_flight", "Jobs running on this process's agents.", g.jobs())
        yield GaugeMetricFamily("pool_credit_leases_open", "Credit leases this process holds.", g.open_leases())
        yield GaugeMetricFamily(
            "pool_ledger_flush_lag_seconds",
            "Age of the oldest charge booked on a credit lease and not yet written to the ledger.",
            g.flush_lag(),
        )
        yield GaugeMetricFamily(
            "pool_request_log_backlog", "Request-log rows waiting to be written.", g.request_backlog()
        )
        yield CounterMetricFamily("pool_redis_errors", "Redis calls that failed (replicas).", g.redis_errors())
        yield CounterMetricFamily(
            "pool_redis_dropped_messages", "Messages to other replicas that were never published.", g.redis_dropped()
        )
        yield GaugeMetricFamily(
            "pool_agents_elsewhere", "Agents connected to other replicas, in this one's mirror.", g.agents_elsewhere()
        )
        yield GaugeMetricFamily(
            "pool_jobs_relayed", "Jobs this process runs on its agents for other replicas' consumers.", g.jobs_relayed()
        )
        views = CounterMetricFamily(
            "pool_public_views_computed", "Public views (status, prices, pages …) computed, by view.", labels=["view"]
        )
        for view, count in sorted(g.views_computed().items()):
            views.add_metric([view], count)
        yield views


class Metrics:
    def __init__(self, gauges: Gauges) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "pool_requests",
            "Chat completion requests by model, HTTP status and whether the platform upstream served them.",
            ("model", "status", "fallback"),
            registry=self.registry,
        )
        self.latency = Histogram(
            "pool_request_duration_seconds",
            "Chat completion requests from arrival to their end.",
            ("model", "fallback"),
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.ttft = Histogram(
            "pool_time_to_first_token_seconds",
            "Streams: from arrival to the first token sent.",
            ("model", "fallback"),
            buckets=TTFT_BUCKETS,
            registry=self.registry,
        )
        self.database_errors = Counter(
            "pool_database_errors", "Errors raised by the database driver.", registry=self.registry
        )
        self._models: set[str] = set()
        self.registry.register(_StateCollector(gauges))
        ProcessCollector(registry=self.registry)  # CPU seconds, memory, open files of this process

    def request(self, record: RequestRecord) -> None:
        """Count a chat request that ended (its row is final)."""
        model = self._label(record.model) if record.status != 404 else OTHER
        fallback = "true" if record.fallback else "false"
        self.requests.labels(model, str(record.status), fallback).inc()
        self.latency.labels(model, fallback).observe(record.latency_ms / 1000)
        if record.ttft_ms is not None:
            self.ttft.labels(model, fallback).observe(record.ttft_ms / 1000)

    def _label(self, model: str) -> str:
        if model in self._models:
            return model
        if not model or len(self._models) >= MODEL_LABELS:
            return OTHER
        self._models.add(model)
        return model

    def watch(self, engine: AsyncEngine) -> None:
        """Count every error the engine's driver raises (connection refused, timeouts, conflicts)."""

        @event.listens_for(engine.sync_engine, "handle_error")
        def _count(_context: object) -> None:
            self.database_errors.inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
