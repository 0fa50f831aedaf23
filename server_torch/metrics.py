"""``GET /metrics``: the server in the Prometheus text format (prometheus_client).

One registry per app (tests build many apps in one process). Route labels are route
templates and error labels are the protocol's codes, so the number of series is fixed
whatever clients send.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_WAITS = (0.001, 0.01, 0.05, 0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, service: Any, waiter: Any, budget: Any) -> None:
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "spliteasy_requests", "HTTP requests answered", ["method", "route", "status"],
            registry=r,
        )  # fmt: skip
        self.rejections = Counter(
            "spliteasy_rejections", "Requests refused, by protocol error code", ["code"],
            registry=r,
        )  # fmt: skip
        self.latency = Histogram(
            "spliteasy_request_seconds", "Time to answer a request (lease waits included)",
            ["route"], buckets=_LATENCY, registry=r,
        )  # fmt: skip
        self.b_seconds = Histogram(
            "spliteasy_b_compute_seconds", "Time inside B per call (forward, backward, step)",
            ["op"], buckets=_LATENCY, registry=r,
        )  # fmt: skip
        self.lease_wait = Histogram(
            "spliteasy_lease_wait_seconds", "Time a request waited for its turn on B",
            buckets=_WAITS, registry=r,
        )  # fmt: skip
        self.sessions_created = Counter(
            "spliteasy_sessions_created", "Sessions created", ["key"], registry=r
        )
        self.evicted = Counter("spliteasy_sessions_evicted", "Idle sessions evicted", registry=r)
        Gauge("spliteasy_steps", "Optimizer steps applied to B", registry=r).set_function(
            lambda: service.trainer.steps
        )
        Gauge(
            "spliteasy_steps_refused", "Steps undone by the finiteness guard", registry=r
        ).set_function(lambda: service.trainer.refused)
        Gauge("spliteasy_sessions", "Open sessions", registry=r).set_function(
            lambda: service.session_count
        )
        Gauge("spliteasy_queue_depth", "Requests waiting for B's lease", registry=r).set_function(
            lambda: waiter.waiting
        )
        Gauge(
            "spliteasy_lease_held", "1 while a device holds B between forward and backward",
            registry=r,
        ).set_function(lambda: 0 if service.lease_left() is None else 1)  # fmt: skip
        Gauge(
            "spliteasy_buffered_body_bytes", "Bytes of request bodies held in memory",
            registry=r,
        ).set_function(lambda: budget.used)  # fmt: skip

    def observe(
        self, method: str, route: str, status: int, seconds: float, code: str | None
    ) -> None:
        self.requests.labels(method, route, str(status)).inc()
        self.latency.labels(route).observe(seconds)
        if status >= 400 and code:
            self.rejections.labels(code).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
