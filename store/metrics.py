"""Prometheus metrics of the credit store (one registry per app). Routes are the
matched route templates (``/store/api/orders/{order_id}``), a bounded set: never a raw path
with an id in it."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

from kernel.observe import with_runtime_collectors

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class StoreMetrics:
    def __init__(self) -> None:
        # The process, GC and platform collectors too: memory and CPU per process.
        self.registry = with_runtime_collectors(CollectorRegistry())
        r = self.registry
        self.requests = Counter("store_requests", "Requests answered, by route, method and "
                                "status.", ["route", "method", "status"], registry=r)  # fmt: skip
        self.seconds = Histogram("store_request_seconds", "Time to answer, by route.",
                                 ["route"], buckets=LATENCY_BUCKETS, registry=r)  # fmt: skip
