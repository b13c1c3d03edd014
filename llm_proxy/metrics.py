"""Prometheus metrics of the proxy (one registry per proxy object; the relay's are in
:mod:`outbox.metrics`).

Label values are bounded sets (routes, status codes, model aliases, paths):
never a user id or an event id, which would grow the series without end.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from kernel.observe import with_runtime_collectors

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                   2.5, 5.0, 10.0, 30.0, 60.0, 120.0)  # fmt: skip
GUARD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.25, 1.0)


class ProxyMetrics:
    def __init__(self) -> None:
        # The process, GC and platform collectors too: memory and CPU per process.
        self.registry = with_runtime_collectors(CollectorRegistry())
        r = self.registry
        self.requests = Counter("llm_proxy_requests", "Requests answered, by route and status.",
                                ["route", "status"], registry=r)  # fmt: skip
        self.charges = Counter("llm_proxy_charges", "Charges made durable, by the path that "
                               "took them (outbox, duplicate, kafka, spool).", ["path"],
                               registry=r)  # fmt: skip
        # Labelled by the calling service (proxy.services' names) and the model alias.
        self.charged_micro = Counter("llm_proxy_charged_microcredits", "Micro-credits "
                                     "charged.", ["service", "model"], registry=r)  # fmt: skip
        self.tokens = Counter("llm_proxy_tokens", "Tokens of charged calls, by kind (input, "
                              "cached, output, reasoning).", ["service", "model", "kind"],
                              registry=r)  # fmt: skip
        self.in_flight = Gauge("llm_proxy_calls_in_flight", "Calls being served now.",
                               ["service"], registry=r)  # fmt: skip
        self.first_byte_seconds = Histogram(
            "llm_proxy_time_to_first_byte_seconds", "From the request to the first byte of "
            "the answer (a stream's headers; a whole answer once charged).",
            ["service", "model"], buckets=LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.estimated = Counter("llm_proxy_usage_estimated", "Charges whose usage was "
                                 "estimated (no usage from upstream, or client gone).",
                                 ["reason"], registry=r)  # fmt: skip
        self.guard_refusals = Counter("llm_proxy_guard_refusals", "Calls refused by the guard.",
                                      ["reason"], registry=r)  # fmt: skip
        self.guard_decisions = Counter("llm_proxy_guard_decisions", "Guard decisions, by the "
                                       "source of the balance (redis, postgres, policy).",
                                       ["source"], registry=r)  # fmt: skip
        self.guard_seconds = Histogram("llm_proxy_guard_seconds", "Guard decision latency.",
                                       buckets=GUARD_BUCKETS, registry=r)  # fmt: skip
        self.upstream_seconds = Histogram("llm_proxy_upstream_seconds", "Upstream call time "
                                          "(to the end of the answer).", ["model"],
                                          buckets=LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.upstream_errors = Counter("llm_proxy_upstream_errors", "Upstream failures.",
                                       ["model", "kind"], registry=r)  # fmt: skip
        self.event_id_reused = Counter("llm_proxy_event_id_reused", "Calls refused with 409 "
                                       "event_id_reused, by where it was noticed (guard: "
                                       "before upstream; outbox: when the charge was "
                                       "written).", ["stage"], registry=r)  # fmt: skip
