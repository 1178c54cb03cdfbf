"""Prometheus metrics of one app: request counts and latency per route, search latency per mode, index sizes.

Each app gets its own CollectorRegistry, so several apps in one process (tests, several servers) never
collide on metric names. Every answer of every route is counted by one middleware, the outermost of the app's
own, 5xx included: one answered by a route, by a handler, or by Starlette for an exception that escaped (which
the middleware sees go by and counts as the 500 it becomes).
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("stair_http_requests", "HTTP requests by route, method and status",
                                ["route", "method", "status"], registry=self.registry)
        self.latency = Histogram("stair_http_request_seconds", "HTTP request latency by route", ["route"],
                                 buckets=LATENCY_BUCKETS, registry=self.registry)
        self.search_latency = Histogram("stair_search_seconds", "Search latency (encode + retrieve + describe)",
                                        ["index", "mode"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.documents = Gauge("stair_index_documents", "Documents in the served version of each index", ["index"],
                               registry=self.registry)
        self.version = Gauge("stair_index_version", "Served version of each index (increases on hot swap)",
                             ["index"], registry=self.registry)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class MetricsMiddleware:
    """Counts every HTTP request under its route *template* (``/thumbnails/{doc_id}``), so ids never become
    label values and the number of series stays bounded; a request whose route was never matched (a 404 path, a
    body refused by the size cap) is counted under ``unmatched``."""

    def __init__(self, app: ASGIApp, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, status = time.perf_counter(), 500

        async def record_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, record_status)
        except Exception:
            status = 500  # what Starlette answers for it (or, after a started answer, what it cut short)
            raise
        finally:
            route = scope.get("route")
            name = getattr(route, "path", None) or "unmatched"
            self.metrics.requests.labels(name, scope["method"], str(status)).inc()
            self.metrics.latency.labels(name).observe(time.perf_counter() - started)
