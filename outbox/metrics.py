"""Prometheus metrics of the outbox relay (one registry per relay)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge


class RelayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.sent = Counter("outbox_relay_sent", "Outbox events acked by Kafka.", registry=r)
        self.failures = Counter("outbox_relay_failures", "Events Kafka did not ack (retried).",
                                registry=r)  # fmt: skip
        self.backlog = Gauge("outbox_backlog", "Outbox rows not yet sent.", registry=r)
        self.spool_drained = Counter("outbox_spool_drained", "Spooled events moved into the "
                                     "outbox.", registry=r)  # fmt: skip
        self.spool_refused = Counter("outbox_spool_refused", "Spool lines not moved into the "
                                     "outbox: not a charge, or an event id taken by another "
                                     "event.", ["reason"], registry=r)  # fmt: skip
