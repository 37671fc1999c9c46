"""API metrics exported through Ray's Prometheus endpoint (names get a ``ray_`` prefix)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, MutableMapping
from typing import Any

from ray.serve import metrics

Scope = MutableMapping[str, Any]


class EventMetrics:
    def __init__(self) -> None:
        self._events = metrics.Counter(
            "persona_events", description="Events applied or rejected", tag_keys=("outcome",)
        )

    def events(self, applied: int = 0, rejected: int = 0) -> None:
        if applied:
            self._events.inc(applied, tags={"outcome": "applied"})
        if rejected:
            self._events.inc(rejected, tags={"outcome": "rejected"})


class ExposureMetrics:
    """What a replica's exposure log wrote, by experiment and variant, and what it had
    to drop (serving.exposures.ExposureLog): counted per flushed batch, not per request."""

    def __init__(self) -> None:
        self._exposures = metrics.Counter(
            "persona_exposures",
            description="recommendation responses logged as exposures, by experiment and variant",
            tag_keys=("experiment", "variant"),
        )
        self._dropped = metrics.Counter(
            "persona_exposures_dropped",
            description="exposures dropped, oldest first, when a replica's buffer was full",
        )
        self._dropped_reported = 0

    def written(self, batch: list, dropped_total: int) -> None:
        arms: dict[tuple[str, str], int] = {}
        for exposure in batch:
            arm = (exposure.experiment or "", exposure.variant or "")
            arms[arm] = arms.get(arm, 0) + 1
        for (experiment, variant), count in arms.items():
            self._exposures.inc(count, tags={"experiment": experiment, "variant": variant})
        if dropped_total > self._dropped_reported:
            self._dropped.inc(dropped_total - self._dropped_reported)
            self._dropped_reported = dropped_total


class RequestMetrics:
    """ASGI middleware that counts and times every HTTP response by endpoint, status and
    experiment variant, whatever produced it: a route, an error raised before the
    route's own code (auth, body limits), FastAPI's parameter validation, the router
    (404, 405) or an unhandled error (500).

    ``endpoint_of(scope)`` names the endpoint after routing: a fixed label per route,
    never the raw path (its ids would make a series per user). A route puts the variant
    it served in ``request.state.variant``."""

    def __init__(self, app: Callable, endpoint_of: Callable[[Scope], str]) -> None:
        self.app = app
        self.endpoint_of = endpoint_of
        # Created on the first request, in the replica: Serve tags them with its context.
        self._requests: metrics.Counter | None = None
        self._latency: metrics.Histogram | None = None

    async def __call__(self, scope: Scope, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status: int | None = None

        async def send_noting_status(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        outcome = 500  # no response started: the app raised
        try:
            await self.app(scope, receive, send_noting_status)
        except asyncio.CancelledError:
            outcome = 499  # the client went away first (nginx's "client closed request")
            raise
        finally:
            variant = scope.get("state", {}).get("variant", "")
            self.record(self.endpoint_of(scope), status or outcome, variant, started)

    def record(self, endpoint: str, status: int, variant: str, started: float) -> None:
        if self._requests is None:
            self._requests = metrics.Counter(
                "persona_requests",
                description="HTTP responses by endpoint, status and experiment variant",
                tag_keys=("endpoint", "status", "variant"),
            )
            self._latency = metrics.Histogram(
                "persona_request_latency_ms",
                description="Request latency by endpoint and status",
                boundaries=[1, 2, 5, 10, 25, 50, 100, 250, 1000],
                tag_keys=("endpoint", "status"),
            )
        tags = {"endpoint": endpoint, "status": str(status), "variant": variant}
        self._requests.inc(tags=tags)
        self._latency.observe(
            (time.perf_counter() - started) * 1000.0,
            tags={"endpoint": endpoint, "status": tags["status"]},
        )
