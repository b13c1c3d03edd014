"""Prometheus metrics of a ledger worker (one registry per worker process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

BATCH_SIZES = (1, 10, 50, 100, 250, 500, 1000, 2000, 5000)
SNAPSHOT_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 60.0, 120.0, 300.0)
BATCH_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class LedgerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.commands = Counter("ledger_commands", "Commands folded, by outcome (applied, "
                                "duplicate, rejected).", ["outcome"], registry=r)  # fmt: skip
        # Bound once: a label lookup per command costs more than the increment.
        self.applied = self.commands.labels("applied")
        self.duplicate = self.commands.labels("duplicate")
        self.rejected = self.commands.labels("rejected")
        self.dead_letters = Counter("ledger_dead_letters", "Commands sent to the dead-letter "
                                    "topic, by reason.", ["reason"], registry=r)  # fmt: skip
        self.batch_size = Histogram("ledger_batch_size_commands", "Commands per folded batch.",
                                    buckets=BATCH_SIZES, registry=r)  # fmt: skip
        self.batch_seconds = Histogram("ledger_batch_seconds", "Time to fold one batch and "
                                       "make it durable.", buckets=BATCH_BUCKETS,
                                       registry=r)  # fmt: skip
        self.lag = Gauge("ledger_consumer_lag_commands", "Commands not yet folded, per "
                         "command topic partition.", ["topic", "partition"],
                         registry=r)  # fmt: skip
        self.recovered = Counter("ledger_recovery_entries", "Ledger entries read back into "
                                 "the state while recovering a partition.",
                                 registry=r)  # fmt: skip
        self.last_batch = Gauge("ledger_last_batch_timestamp_seconds", "When the worker last "
                                "made a batch durable (Unix time).", registry=r)  # fmt: skip
        self.snapshots = Counter("ledger_snapshots", "Fold-state snapshots written to Postgres, "
                                 "by outcome (taken, failed).", ["outcome"],
                                 registry=r)  # fmt: skip
        self.snapshot_seconds = Histogram("ledger_snapshot_seconds", "Time to write one "
                                          "partition's snapshot.", buckets=SNAPSHOT_BUCKETS,
                                          registry=r)  # fmt: skip
        self.snapshot_bytes = Gauge("ledger_snapshot_bytes", "Size of the newest snapshot "
                                    "written, per partition.", ["partition"],
                                    registry=r)  # fmt: skip
        self.snapshot_restores = Counter("ledger_snapshot_restores", "Partitions' states "
                                         "restored from snapshots on assignment, by outcome "
                                         "(restored, corrupt, failed).", ["outcome"],
                                         registry=r)  # fmt: skip
        # Exported from the start at 0, so that an alert's increase() sees the first failure.
        for outcome in ("taken", "failed"):
            self.snapshots.labels(outcome)
        for outcome in ("restored", "corrupt", "failed"):
            self.snapshot_restores.labels(outcome)
