"""Prometheus metrics: counters updated as jobs end, gauges read at scrape time.

Gauges (queue depth, workers by state) are computed when /metrics is read,
so the job path pays nothing for them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class _Gauges(Collector):
    def __init__(self, read: Callable[[], dict[str, Any]]) -> None:
        self._read = read

    def collect(self) -> Iterator[GaugeMetricFamily]:
        s = self._read()
        yield GaugeMetricFamily("poold_queue_depth", "Jobs queued and not yet started", value=s["queued"])
        g = GaugeMetricFamily("poold_workers", "Worker processes by state", labels=["state"])
        for state in ("idle", "busy", "starting"):
            g.add_metric([state], s["workers"].get(state, 0))
        yield g
        yield GaugeMetricFamily("poold_jobs_running", "Jobs running now", value=s["running"])
        yield GaugeMetricFamily("poold_draining", "1 while the daemon drains for shutdown",
                                value=1 if s["draining"] else 0)


class Metrics:
    """One registry per daemon (tests start several daemons in one process)."""

    def __init__(self, read_state: Callable[[], dict[str, Any]]) -> None:
        self.registry = CollectorRegistry()
        self.submitted = Counter("poold_jobs_submitted", "Jobs accepted", registry=self.registry)
        self.finished = Counter("poold_jobs_finished", "Jobs that reached a final state",
                                ["state"], registry=self.registry)
        self.retried = Counter("poold_job_retries", "Failed attempts that were retried",
                               registry=self.registry)
        self.duration = Histogram("poold_job_duration_seconds", "Run time of one attempt",
                                  buckets=(0.001, 0.005, 0.025, 0.1, 0.5, 1, 5, 30, 120, 600, float("inf")),
                                  registry=self.registry)
        self.worker_restarts = Counter("poold_worker_restarts", "Workers replaced, by cause",
                                       ["cause"], registry=self.registry)
        self.registry.register(_Gauges(read_state))

    def render(self) -> bytes:
        return generate_latest(self.registry)
