"""Prometheus metrics of a projector (one registry per projector process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

BATCH_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class ProjectorMetrics:
    def __init__(self, sink: str) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        labels = {"sink": sink}
        self.applied = Counter("projector_entries_applied", "Ledger entries applied to the "
                               "read model (redeliveries skipped are not counted).",
                               ["sink"], registry=r).labels(**labels)  # fmt: skip
        self.rewinds = Counter("projector_rewinds", "Times a partition was found ahead of "
                               "the stored progress and sought back.", ["sink"],
                               registry=r).labels(**labels)  # fmt: skip
        self.batch_seconds = Histogram("projector_batch_seconds", "Time to apply one batch.",
                                       ["sink"], buckets=BATCH_BUCKETS,
                                       registry=r).labels(**labels)  # fmt: skip
        self.lag = Gauge("projector_lag_entries", "Ledger entries not yet applied, per "
                         "partition (high watermark minus position).", ["sink", "partition"],
                         registry=r)  # fmt: skip
        self.last_applied = Gauge("projector_last_applied_timestamp_seconds", "When the "
                                  "projector last applied an entry (Unix time).", ["sink"],
                                  registry=r).labels(**labels)  # fmt: skip
        self.sink = sink
