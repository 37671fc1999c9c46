"""API metrics exported through Ray's Prometheus endpoint (names get a ``ray_`` prefix)."""

from __future__ import annotations

import time

from ray.serve import metrics


class ApiMetrics:
    def __init__(self) -> None:
        self._requests = metrics.Counter(
            "persona_requests",
            description="HTTP requests by endpoint, status and experiment variant",
            tag_keys=("endpoint", "status", "variant"),
        )
        self._latency = metrics.Histogram(
            "persona_request_latency_ms",
            description="Request latency by endpoint",
            boundaries=[1, 2, 5, 10, 25, 50, 100, 250, 1000],
            tag_keys=("endpoint",),
        )
        self._events = metrics.Counter(
            "persona_events", description="Events applied or rejected", tag_keys=("outcome",)
        )

    def request(self, endpoint: str, status: int, started: float, variant: str = "") -> None:
        self._requests.inc(tags={"endpoint": endpoint, "status": str(status), "variant": variant})
        self._latency.observe((time.perf_counter() - started) * 1000.0, tags={"endpoint": endpoint})

    def events(self, applied: int = 0, rejected: int = 0) -> None:
        if applied:
            self._events.inc(applied, tags={"outcome": "applied"})
        if rejected:
            self._events.inc(rejected, tags={"outcome": "rejected"})
