"""The projector loop: read the ledger topic, hand batches to one sink.

Each sink (Redis, Postgres) runs as its own process in its own consumer group
(``creditledger project redis|postgres``); several processes of one sink share
the partitions. Where to start is not Kafka's committed offset but the
progress the sink stored with its rows (read on every assignment); offsets
are also committed to Kafka, only so that the usual lag tools show the truth.

Stopping: SIGTERM/SIGINT finish the current batch and leave. SIGKILL at any
moment is safe too: each batch is one transaction (Postgres) or one script
(Redis) together with its progress, so the read model is always the fold of a
prefix of each partition, and the next run resumes from that prefix.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition

from kernel.errors import CreditLedgerError, ProjectionError, StackError
from kernel.settings import Settings
from projections.entries import LogPosition, Row, decode_row
from projections.metrics import ProjectorMetrics
from projections.progress import OFFSET, BatchPlan
from streams.codec import AvroCodec
from streams.kafka_clients import make_consumer

LAG_EVERY_S = 5.0  # how often the lag gauges are refreshed

log = logging.getLogger(__name__)

IDLE_RESEEK_S = 2.0

T = TypeVar("T")


class Sink(Protocol):
    name: str

    def start(self) -> None: ...

    def close(self) -> None: ...

    def stored(self, topic: str, partitions: list[int]) -> dict[int, int]: ...

    def apply(self, topic: str, rows: dict[int, list[Row]], lows: dict[int, int],
              sought: dict[int, int]) -> BatchPlan: ...  # fmt: skip


@dataclass
class ProjectorStats:
    batches: int = 0
    applied: int = 0
    skipped: int = 0
    rewinds: int = 0
    started: float = field(default_factory=time.monotonic)


class Projector:
    """Runs one sink over the ledger topic, in a consumer group or on fixed partitions."""

    def __init__(self, settings: Settings, sink: Sink, codec: AvroCodec, *, group_id: str,
                 topic: str | None = None, batch_max: int | None = None,
                 retry_for_s: float | None = 60.0,
                 metrics: ProjectorMetrics | None = None) -> None:  # fmt: skip
        self.settings = settings
        self.sink = sink
        self.metrics = metrics or ProjectorMetrics(sink.name)
        self.codec = codec
        self.group_id = group_id
        self.topic = topic or settings.projections.ledger_topic
        self.batch_max = batch_max or settings.projections.batch_max
        self.poll_s = settings.projections.poll_timeout_ms / 1000
        self.retry_for_s = retry_for_s  # None: retry for as long as it takes
        self.stats = ProjectorStats()
        self.lows: dict[int, int] = {}
        self.sought: dict[int, int] = {}
        self.assigned: set[int] = set()
        self._consumer: Consumer | None = None

    # -- assignment ------------------------------------------------------------------------

    def _position(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        numbers = [tp.partition for tp in partitions]
        stored = self._retrying("reading the stored progress",
                                lambda: self.sink.stored(self.topic, numbers))  # fmt: skip
        for tp in partitions:
            low, _high = consumer.get_watermark_offsets(tp, timeout=10)
            self.lows[tp.partition] = low
            tp.offset = stored.get(tp.partition, OFFSET_BEGINNING)
        self.assigned = set(numbers)
        self.sought.clear()
        log.info("%s projector assigned %s, resuming at %s", self.sink.name, sorted(numbers),
                 {tp.partition: tp.offset for tp in partitions})  # fmt: skip

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._position(consumer, partitions)
        consumer.assign(partitions)

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self.assigned -= {tp.partition for tp in partitions}

    def start(self, partitions: list[int] | None = None) -> None:
        """Join the group, or (``partitions`` given) read those partitions with no group."""
        self.sink.start()
        consumer = make_consumer(
            self.settings, self.group_id, **{"enable.partition.eof": False,
                                             "fetch.wait.max.ms": 50},
        )  # fmt: skip
        if partitions is None:
            consumer.subscribe([self.topic], on_assign=self._on_assign, on_revoke=self._on_revoke,
                               on_lost=self._on_revoke)  # fmt: skip
        else:
            tps = [TopicPartition(self.topic, p) for p in partitions]
            self._position(consumer, tps)
            consumer.assign(tps)
        self._consumer = consumer

    def close(self) -> None:
        if self._consumer is not None:
            self._consumer.close()
            self._consumer = None
        self.sink.close()

    # -- the loop --------------------------------------------------------------------------

    def poll_batch(self) -> dict[int, list[Row]]:
        consumer = self._consumer
        if consumer is None:
            raise ProjectionError("projector used before start()")
        messages = consumer.consume(num_messages=self.batch_max, timeout=self.poll_s)
        rows: dict[int, list[Row]] = defaultdict(list)
        for message in messages:
            error = message.error()
            if error is not None:
                if error.code() == KafkaError._PARTITION_EOF:
                    continue
                if error.code() == KafkaError.UNKNOWN_TOPIC_OR_PART:
                    raise StackError(f"reading {self.topic}: {error}; create the topics with "
                                     "`creditledger topics apply`")  # fmt: skip
                if error.fatal():
                    raise StackError(f"reading {self.topic}: {error}")
                # Transient (broker restart, network): librdkafka retries by itself.
                log.warning("%s projector: %s", self.sink.name, error)
                continue
            partition, offset = message.partition(), message.offset()
            if partition is None or offset is None or partition not in self.assigned:
                continue  # fetched before a revoke
            where = LogPosition(self.topic, partition, offset)
            rows[partition].append(decode_row(self.codec, message.value(), where))
        return rows

    def apply(self, rows: dict[int, list[Row]]) -> BatchPlan:
        """Apply one batch; on a lost connection, reconnect and retry (see ``retry_for_s``)."""
        started = time.monotonic()
        plan = self._retrying(
            "applying a batch", lambda: self.sink.apply(self.topic, rows, self.lows, self.sought)
        )
        self._after(rows, plan)
        self.metrics.batch_seconds.observe(time.monotonic() - started)
        return plan

    def _retrying(self, what: str, step: Callable[[], T]) -> T:
        """``step()``, reconnecting the sink with backoff (1 s doubling to 10 s) while its
        store is unreachable: a restart of Postgres or Redis is ridden out, not fatal."""
        deadline = None if self.retry_for_s is None else time.monotonic() + self.retry_for_s
        pause = 1.0
        while True:
            try:
                return step()
            except (ProjectionError, StackError) as exc:
                if deadline is not None and time.monotonic() > deadline:
                    raise
                log.warning("%s projector: %s failed (%s); reconnecting, retry in %.0f s",
                            self.sink.name, what, exc, pause)  # fmt: skip
                time.sleep(pause)
                pause = min(pause * 2, 10.0)
                self._reconnect()

    def _reconnect(self) -> None:
        try:
            self.sink.close()
            self.sink.start()
        except CreditLedgerError as exc:
            log.warning("%s projector: still cannot connect: %s", self.sink.name, exc)

    def _after(self, rows: dict[int, list[Row]], plan: BatchPlan) -> None:
        consumer = self._consumer
        assert consumer is not None
        for partition, offset in plan.rewinds.items():
            log.warning("%s projector: partition %d is ahead of its stored progress; "
                        "seeking back to %d", self.sink.name, partition, offset)  # fmt: skip
            consumer.seek(TopicPartition(self.topic, partition, offset))
            self.sought[partition] = offset
        for partition in plan.apply:
            self.sought.pop(partition, None)
        applied = sum(len(r) for r in plan.apply.values())
        self.stats.batches += 1
        self.stats.applied += applied
        self.stats.rewinds += len(plan.rewinds)
        self.metrics.applied.inc(applied)
        self.metrics.rewinds.inc(len(plan.rewinds))
        if applied:
            self.metrics.last_applied.set(time.time())
        self.stats.skipped += sum(len(r) for r in rows.values()) - applied
        if plan.next_offsets:
            offsets = [TopicPartition(self.topic, p, o) for p, o in plan.next_offsets.items()]
            try:
                consumer.commit(offsets=offsets, asynchronous=True)
            except Exception as exc:  # only informative: the sink holds the real progress
                log.debug("offset commit failed: %s", exc)

    def run(self, should_stop: Callable[[], bool], *,
            report_every_s: float = 10.0) -> ProjectorStats:  # fmt: skip
        last_report = lag_due = time.monotonic()
        while not should_stop():
            rows = self.poll_batch()
            if rows:
                self.apply(rows)
            now = time.monotonic()
            if now >= lag_due:
                lag_due = now + LAG_EVERY_S
                self._report_lag()
            if now - last_report >= report_every_s:
                last_report = now
                log.info("%s projector: %d entries applied in %d batches, %d redelivered "
                         "skipped, %d rewinds", self.sink.name, self.stats.applied,
                         self.stats.batches, self.stats.skipped, self.stats.rewinds)  # fmt: skip
        return self.stats

    def _report_lag(self) -> None:
        """Per assigned partition: the high watermark the consumer last fetched (cached, no
        request) minus its position."""
        consumer = self._consumer
        if consumer is None:
            return
        for partition in sorted(self.assigned):
            tp = TopicPartition(self.topic, partition)
            try:
                _low, high = consumer.get_watermark_offsets(tp, cached=True)
                (position,) = consumer.position([tp])
            except Exception:  # not fetched yet
                continue
            if high >= 0 and position.offset >= 0:
                self.metrics.lag.labels(self.sink.name, str(partition)).set(
                    max(high - position.offset, 0))  # fmt: skip

    def run_until(self, ends: dict[int, int], should_stop: Callable[[], bool] = lambda: False,
                  on_batch: Callable[[int], Any] | None = None) -> None:  # fmt: skip
        """With fixed partitions: apply until the sink's progress reaches ``ends``."""
        remaining = {p: e for p, e in ends.items() if e > self.lows.get(p, 0)}
        stored = self.sink.stored(self.topic, sorted(remaining))
        remaining = {p: e for p, e in remaining.items() if stored.get(p, 0) < e}
        consumer = self._consumer
        assert consumer is not None
        idle_since = time.monotonic()
        while remaining and not should_stop():
            polled = self.poll_batch()
            rows: dict[int, list[Row]] = {}
            for p, partition_rows in polled.items():
                end = ends.get(p, 0)
                rows[p] = [r for r in partition_rows if r[OFFSET] < end]
                if len(rows[p]) < len(partition_rows):
                    # Read past the end: go back there, so a later call starts at the end.
                    consumer.seek(TopicPartition(self.topic, p, end))
            rows = {p: rs for p, rs in rows.items() if rs}
            if not rows:
                if time.monotonic() - idle_since > IDLE_RESEEK_S:
                    # Nothing arrives although the end is not reached: the position
                    # drifted from the sink's progress; start again from the progress.
                    stored = self.sink.stored(self.topic, sorted(remaining))
                    for p in remaining:
                        offset = stored.get(p, self.lows.get(p, 0))
                        consumer.seek(TopicPartition(self.topic, p, offset))
                    idle_since = time.monotonic()
                continue
            idle_since = time.monotonic()
            plan = self.apply(rows)
            if on_batch is not None:
                on_batch(sum(len(r) for r in plan.apply.values()))
            for p, next_offset in plan.next_offsets.items():
                if next_offset >= remaining.get(p, 0):
                    remaining.pop(p, None)
