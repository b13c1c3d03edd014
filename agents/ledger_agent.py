"""The ledger agent: fold command batches into ledger entries, exactly once per event_id.

Per batch (one partition's commands stay in order; one in-flight batch per
worker; the batch is what Faust has queued for the agent):

1. decode each command, look up its account and event_id in the state table,
   :func:`agents.domain.decide`;
2. produce every new entry to ``credit.ledger.entries`` (same partition as
   the command) and every rejection to ``credit.commands.rejected``, with one
   idempotent confluent-kafka producer (acks=all);
3. flush and require every delivery to succeed;
4. apply the acked entries to the state table (with their ledger offsets);
5. return, which lets Faust ack the batch's commands; it commits offsets only
   after that (and after flushing its own producer).

A crash anywhere leaves the ledger with a prefix of the batch's entries (per
partition, the idempotent producer keeps order and leaves no holes) and the
state at most as far as the ledger. On restart Faust recovers the state by
folding the ledger from the stored offset to its end, and the uncommitted
commands come again: those already in the ledger are recognised as
duplicates by event_id, the rest are decided on top of the recovered state.
Nothing is lost, nothing is applied twice. See ARCHITECTURE.md.

Why the agent checks its own input: faust-streaming can skip a message. Seen
here: a worker joining while another was still recovering made Faust drop the
first message of a partition unacked, filter the re-fetched copy as "already
read", and commit past it (its commit check tolerates a hole of exactly one
at the head). So the agent verifies that every command topic-partition
arrives without holes: the first message after an assignment must be at the
group's committed offset, each next one at the previous + 1. A hole is read
directly from Kafka and folded first. Folding something twice is harmless
(a duplicate by event_id), so the check can only add safety.

Why the batch body has no ``await``: a body cancelled halfway (a stopping
worker) must not be followed by acks or a commit. Without await points it
cannot be cancelled halfway, and any exception ends the process at once
(``os._exit``), before Faust can commit anything. A crash is safe by design;
a half-done graceful stop is not.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from confluent_kafka import KafkaError, TopicPartition
from faust.types import TP

from agents.app import LedgerApp
from agents.domain import DAY_MS, Account, Applied, Duplicate, Limits, Seen, decide, evolve
from agents.metrics import LedgerMetrics
from agents.snapshots import FoldSnapshots
from agents.state import LedgerStateTable, StateWrite
from contracts.cloudevents import (
    REDRIVE_CHECKED,
    TRACEPARENT,
    event_headers,
    header,
    kafka_headers,
)
from contracts.commands import Command
from contracts.records import LEDGER_TOPIC, REJECTED_TOPIC, command_from_record, entry_to_record
from kernel.errors import CodecError, CreditLedgerError
from kernel.settings import Settings
from streams.codec import AvroCodec
from streams.kafka_clients import make_consumer, make_producer, partition_of

# CloudEvents types of what the worker writes (commands are typed by their topic's name).
ENTRY_EVENT = "credit.ledger.entry"
REJECTED_EVENT = "credit.command.rejected"

log = logging.getLogger(__name__)

EXIT_FATAL = 70  # EX_SOFTWARE
STATS_EVERY_S = 10.0
LAG_EVERY_S = 5.0  # how often the lag gauges are refreshed (after a batch)
FORGET_EVERY_S = 60.0  # how often event ids older than the idempotency window are forgotten
FORGET_MAX = 50_000  # per partition and round: a bounded pause of the loop
HOME_CACHE_MAX = 1_000_000  # users whose partition is remembered (pure-Python murmur2 is slow)


@dataclass(frozen=True, slots=True)
class Incoming:
    """One command message, whoever fetched it (Faust, or the gap filler)."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp_ms: int
    # The W3C traceparent the command's producer sent; copied onto its entry.
    traceparent: str | None = None
    # A stale command re-driven after a check against the ledger (no idempotency window).
    redriven: bool = False

    @classmethod
    def from_faust(cls, event: Any) -> Incoming:
        message = event.message
        # Faust reports the Kafka timestamp in (float) seconds; Kafka stores whole ms.
        return cls(message.topic, message.partition, message.offset, message.key,
                   message.value, round(message.timestamp * 1000),
                   header(message.headers, TRACEPARENT),
                   header(message.headers, REDRIVE_CHECKED) is not None)  # fmt: skip


class FoldError(CreditLedgerError):
    """The batch could not be made durable; the worker must stop without committing."""


@dataclass
class FoldStats:
    batches: int = 0
    commands: int = 0
    applied: int = 0
    duplicates: int = 0
    rejected: int = 0
    gap_filled: int = 0
    busy_s: float = 0.0

    def line(self) -> str:
        rate = self.commands / self.busy_s if self.busy_s else 0.0
        return (
            f"{self.commands} commands in {self.batches} batches: {self.applied} applied, "
            f"{self.duplicates} duplicates, {self.rejected} rejected, "
            f"{self.gap_filled} recovered from input holes; "
            f"{rate:,.0f} commands/s while busy"
        )


@dataclass
class Batch:
    """One batch's working state: the accounts and event ids it folded so far (the state
    table learns them only once Kafka acked them), and what Kafka acked."""

    accounts: dict[tuple[int, str], Account] = field(default_factory=dict)
    seen: dict[str, Seen] = field(default_factory=dict)
    writes: list[StateWrite] = field(default_factory=list)
    # The state only needs, per partition, the highest acked ledger offset (its
    # persisted offset); one shared callback records it.
    acked_max: dict[int, int] = field(default_factory=dict)
    acked: int = 0
    failures: list[KafkaError] = field(default_factory=list)
    # The worker's clock for the idempotency window: one reading per batch.
    now_ms: int = field(default_factory=lambda: time.time_ns() // 1_000_000)

    def entry_delivered(self, err: KafkaError | None, msg: Any) -> None:
        if err is not None:
            self.failures.append(err)
            return
        self.acked += 1
        partition, offset = msg.partition(), msg.offset()
        if offset > self.acked_max.get(partition, -1):
            self.acked_max[partition] = offset

    def letter_delivered(self, err: KafkaError | None, _msg: Any) -> None:
        if err is not None:
            self.failures.append(err)


class LedgerFolder:
    """Folds batches of command messages; owns the producer for entries and dead letters."""

    def __init__(self, settings: Settings, codec: AvroCodec, state: LedgerStateTable,
                 partitions: int, worker_name: str,
                 metrics: LedgerMetrics | None = None) -> None:  # fmt: skip
        self.settings = settings
        self.metrics = metrics or LedgerMetrics()
        self.partitions = partitions
        self._homes: dict[str, int] = {}
        self.codec = codec
        self.state = state
        self.worker_name = worker_name
        self.source = f"{settings.ledger.app_id}/{worker_name}"  # ce_source of what it writes
        self.limits = Limits(max_amount_micro=settings.ledger.max_amount_micro,
                             idempotency_window_ms=settings.ledger.idempotency_window_days
                             * DAY_MS)  # fmt: skip
        self.stats = FoldStats()
        self._producer: Any = None
        self._reader: Any = None  # committed offsets and hole filling
        self._next: dict[tuple[str, int], int] = {}  # next offset expected per command tp
        # What the last batch folded that Faust never delivered: acked to Faust too.
        self.filled: list[Incoming] = []
        self._last_stats = time.monotonic()

    def start(self) -> None:
        """Connect the producer (not at construction: nothing connects before start)."""
        if self._producer is None:
            self._producer = make_producer(
                self.settings,
                **{"client.id": f"{self.settings.kafka.client_id}-ledger-{self.worker_name}",
                   "linger.ms": 2, "batch.size": 1_000_000},
            )  # fmt: skip
        if self._reader is None:
            # Same group id, so committed() answers for the workers' group; it never
            # subscribes or commits, so it never joins the group.
            self._reader = make_consumer(
                self.settings, self.settings.ledger.app_id,
                **{"client.id": f"{self.settings.kafka.client_id}-gapfill-{self.worker_name}"},
            )  # fmt: skip

    def next_offsets(self) -> dict[tuple[str, int], int]:
        """The next offset the fold expects, per command topic partition it holds."""
        return dict(self._next)

    def forget(self, partitions: Any) -> None:
        """A rebalance moved these partitions: their next offset is the committed one again."""
        for tp in partitions:
            self._next.pop((tp.topic, tp.partition), None)

    def _expected_start(self, topic: str, partition: int) -> int:
        tp = TopicPartition(topic, partition)
        committed = self._reader.committed([tp], timeout=10)[0].offset
        if committed is not None and committed >= 0:
            return int(committed)
        low, _high = self._reader.get_watermark_offsets(tp, timeout=10)
        return int(low)

    def _read_hole(self, topic: str, partition: int, start: int, end: int) -> list[Incoming]:
        """Messages [start, end) of one partition, straight from Kafka."""
        reader = self._reader
        reader.assign([TopicPartition(topic, partition, start)])
        found: dict[int, Incoming] = {}
        deadline = time.monotonic() + self.settings.ledger.flush_timeout_s * 4
        while len(found) < end - start and time.monotonic() < deadline:
            for message in reader.consume(num_messages=1000, timeout=0.5):
                if message.error():
                    continue
                offset = message.offset()
                if start <= offset < end:
                    headers = message.headers()
                    redriven = header(headers, REDRIVE_CHECKED) is not None
                    found[offset] = Incoming(topic, partition, offset, message.key(),
                                             message.value(), message.timestamp()[1],
                                             header(headers, TRACEPARENT), redriven)  # fmt: skip
        reader.unassign()
        if len(found) < end - start:
            # Offsets may be missing for good (deleted by retention): take what exists,
            # but only once the partition's low watermark says so.
            low, _high = reader.get_watermark_offsets(TopicPartition(topic, partition), timeout=10)
            if any(offset >= low and offset not in found for offset in range(start, end)):
                raise FoldError(f"could not read {topic}[{partition}] offsets {start}..{end - 1}")
        return [found[offset] for offset in sorted(found)]

    def with_holes_filled(self, items: list[Incoming]) -> list[Incoming]:
        """The batch, with any message Faust skipped put back in its place."""
        out: list[Incoming] = []
        next_offsets = self._next
        for item in items:
            tp = (item.topic, item.partition)
            expected = next_offsets.get(tp)
            if expected is None:
                expected = self._expected_start(item.topic, item.partition)
            if item.offset > expected:
                hole = self._read_hole(item.topic, item.partition, expected, item.offset)
                # After a rebalance this can also be a commit that lagged (harmless:
                # those fold as duplicates); mid-assignment it is a message Faust lost.
                log.warning(
                    "%s[%s]: offsets %s..%s not delivered by Faust; folding %d from Kafka",
                    item.topic, item.partition, expected, item.offset - 1, len(hole),
                )  # fmt: skip
                self.stats.gap_filled += len(hole)
                self.filled.extend(hole)
                out.extend(hole)
            out.append(item)
            if item.offset >= expected:
                next_offsets[tp] = item.offset + 1
        return out

    def fold_batch(self, events: list[Any]) -> None:
        """Fold one batch; raise :class:`FoldError` when it could not be made durable."""
        started = time.monotonic()
        self.filled = []
        items = self.with_holes_filled([Incoming.from_faust(event) for event in events])
        producer = self._producer
        assert producer is not None, "LedgerFolder.start() first"
        batch = Batch()
        for index, message in enumerate(items):
            command = self._command_of(message, batch)
            if command is not None:
                self._fold_one(message, command, batch)
            if index % 500 == 499:
                producer.poll(0)  # serve delivery reports now and then, not per message
        self._make_durable(batch)
        self.stats.batches += 1
        self.stats.commands += len(items)
        elapsed = time.monotonic() - started
        self.stats.busy_s += elapsed
        self.metrics.batch_size.observe(len(items))
        self.metrics.batch_seconds.observe(elapsed)
        self.metrics.last_batch.set(time.time())
        if time.monotonic() - self._last_stats > STATS_EVERY_S:
            self._last_stats = time.monotonic()
            log.info("ledger fold: %s", self.stats.line())

    def _command_of(self, message: Incoming, batch: Batch) -> Command | None:
        """The message's command, or None once it went to the DLQ (it does not decode, is
        on the wrong topic, or on a partition that is not its user's)."""
        try:
            decoded = self.codec.decode(message.value, plain_times=True)
        except CodecError as exc:
            self._dead_letter(message, exc.reason, str(exc), None, None, batch.letter_delivered)
            return None
        if decoded.event_type != message.topic:
            self._dead_letter(
                message, "invalid", f"a {decoded.event_type} event on topic {message.topic}",
                decoded.record.get("event_id"), decoded.record.get("user_id"),
                batch.letter_delivered,
            )  # fmt: skip
            return None
        command = command_from_record(message.topic, decoded.record)
        home = self._home_partition(command.user_id)
        if home != message.partition:
            # The state is kept per partition: an account split over two
            # partitions would get two seq counters. Refuse, loudly.
            self._dead_letter(
                message, "invalid",
                f"user {command.user_id!r} belongs on partition {home}, the command came on "
                f"{message.partition}: its producer does not use the murmur2 partitioner",
                command.event_id, command.user_id, batch.letter_delivered,
            )  # fmt: skip
            return None
        return command

    def _fold_one(self, message: Incoming, command: Command, batch: Batch) -> None:
        """Decide one command against the state as this batch left it, and produce what
        comes out: an entry (acked later, with the batch), nothing, or a dead letter."""
        partition = message.partition
        key = (partition, command.user_id)
        account = batch.accounts.get(key)
        if account is None:
            account = self.state.account(partition, command.user_id)
        first = batch.seen.get(command.event_id) or self.state.seen(partition, command.event_id)
        # The message's own timestamp: a redelivered command decides identically.
        outcome = decide(account, first, command, self.limits, message.timestamp_ms,
                         now_ms=None if message.redriven else batch.now_ms)  # fmt: skip
        if isinstance(outcome, Applied):
            entry = outcome.entry
            value = self.codec.encode(LEDGER_TOPIC, entry_to_record(entry), checked=False)
            headers = event_headers(entry.event_id, ENTRY_EVENT, self.source,
                                    message.timestamp_ms, message.traceparent)  # fmt: skip
            self._producer.produce(LEDGER_TOPIC, key=entry.user_id.encode(), value=value,
                                   partition=partition, headers=kafka_headers(headers),
                                   on_delivery=batch.entry_delivered)  # fmt: skip
            batch.accounts[key] = evolve(account, entry)
            batch.seen[entry.event_id] = Seen(entry.user_id, entry.seq, entry.command_digest)
            batch.writes.append(StateWrite(partition, 0, entry.user_id, entry.seq,
                                           entry.balance_after_micro, entry.event_id,
                                           entry.command_digest, entry.occurred_at_ms))  # fmt: skip
            self.stats.applied += 1
            self.metrics.applied.inc()
        elif isinstance(outcome, Duplicate):
            self.stats.duplicates += 1
            self.metrics.duplicate.inc()
        else:
            self._dead_letter(message, outcome.reason, outcome.detail, outcome.event_id,
                              outcome.user_id, batch.letter_delivered)  # fmt: skip

    def _make_durable(self, batch: Batch) -> None:
        """Wait for Kafka to ack every entry and dead letter of the batch, then apply the
        acked entries to the state; anything not acked is a FoldError (no commit)."""
        timeout_s = self.settings.ledger.flush_timeout_s
        remaining = self._producer.flush(timeout_s)
        if remaining or batch.failures or batch.acked != len(batch.writes):
            raise FoldError(
                f"{remaining} ledger/DLQ messages unacknowledged after {timeout_s} s, "
                f"{len(batch.failures)} failed ({batch.failures[:3]}); exiting without "
                "committing the batch"
            )
        self.state.apply_entries(batch.writes, trusted=True, offsets=batch.acked_max)

    def _home_partition(self, user_id: str) -> int:
        """Where murmur2 puts this user (what every producer of ours computes)."""
        home = self._homes.get(user_id)
        if home is None:
            if len(self._homes) > HOME_CACHE_MAX:
                self._homes.clear()
            home = partition_of(user_id, self.partitions)
            self._homes[user_id] = home
        return home

    def _dead_letter(self, message: Incoming, reason: str, detail: str, event_id: str | None,
                     user_id: str | None, on_delivery: Any) -> None:  # fmt: skip
        rejected_at = time.time_ns() // 1_000_000
        record = {
            "original_value": message.value,
            "original_key": message.key,
            "topic": message.topic,
            "partition": message.partition,
            "offset": message.offset,
            "reason": reason,
            "detail": detail[:2000],
            "event_id": event_id if isinstance(event_id, str) else None,
            "user_id": user_id if isinstance(user_id, str) else None,
            "rejected_at": rejected_at,
            "rejected_by": f"ledger-{self.worker_name}",
        }
        value = self.codec.encode(REJECTED_TOPIC, record)
        # A dead letter's id: where its command was (an event id may be missing or bad).
        letter_id = f"{message.topic}/{message.partition}/{message.offset}"
        headers = event_headers(letter_id, REJECTED_EVENT, self.source, rejected_at,
                                message.traceparent)  # fmt: skip
        self._producer.produce(REJECTED_TOPIC, key=message.key, value=value,
                               headers=kafka_headers(headers), on_delivery=on_delivery)  # fmt: skip
        self.stats.rejected += 1
        self.metrics.rejected.inc()
        self.metrics.dead_letters.labels(reason).inc()


def fold_or_die(folder: LedgerFolder, events: list[Any]) -> None:
    """Fold a batch; on any failure end the process before Faust can commit offsets."""
    try:
        folder.fold_batch(events)
    except BaseException as exc:
        log.critical("ledger fold failed, exiting without commit: %r", exc, exc_info=True)
        logging.shutdown()
        os._exit(EXIT_FATAL)


@dataclass(eq=False)
class FilledMessage:
    """What Faust's ``Consumer.ack`` reads of a message, for an offset the agent folded
    itself (a hole Faust skipped)."""

    topic: str
    tp: TP
    offset: int
    acked: bool = False


def ack_batch(consumer: Any, monitor: Any, batch: list[Any], filled: list[Incoming]) -> None:
    """Ack a durable batch to Faust, and the holes it filled too.

    Faust commits only up to the first offset it has not seen acked (``_new_offset``:
    with the head of a partition missing it commits nothing at all), so a filled hole
    left unacked kept the group's committed offset behind what was folded, for as long
    as the worker ran: lag that lies, acks piling up, and a re-fold of all of it after
    the next crash."""
    now = time.monotonic()
    for event in batch:
        event.ack()
        # What Stream iteration would record; Faust's slow-stream check reads it.
        monitor.stream_inbound_time[event.message.tp] = now
    for item in filled:
        consumer.ack(FilledMessage(item.topic, TP(item.topic, item.partition), item.offset))


def report_lag(folder: LedgerFolder, consumer: Any) -> None:
    """Per command partition: the high watermark Faust's consumer last saw, minus the next
    offset the fold expects (Faust's own fetches keep it fresh: no extra request)."""
    for (topic, partition), next_offset in folder.next_offsets().items():
        try:
            high = consumer.highwater(TP(topic, partition))
        except Exception:  # not known yet (a partition just assigned)
            continue
        if high is not None:
            folder.metrics.lag.labels(topic, str(partition)).set(max(int(high) - next_offset, 0))


def register_ledger_agent(ledger_app: LedgerApp, settings: Settings, worker_name: str,
                          metrics: LedgerMetrics | None = None,
                          snapshots: FoldSnapshots | None = None) -> LedgerFolder:  # fmt: skip
    """Attach the fold to the app: one agent instance, one batch in flight.

    The agent drains its channel's queue in bulk instead of iterating Faust's
    ``Stream``: measured here, ``Stream`` iteration costs ~67 µs per message
    (two task round trips in ``mode.Service.wait_first`` each), the bulk drain
    ~50 µs. Everything else stays Faust's: group membership, recovery, the
    queue and its clearing on rebalance, acks and commits. Faust's conductor
    hands over one message per await, so a batch needs a moment to gather:
    when fewer than ``ledger.batch_max`` are queued, the agent waits
    ``ledger.batch_within_ms`` before draining (under load it never waits).
    Events are acked only after their batch is durable. With ``snapshots``, partitions
    are restored from snapshots when assigned, and snapshotted between batches when due.
    """
    folder = LedgerFolder(settings, ledger_app.codec, ledger_app.state,
                          ledger_app.partitions, worker_name, metrics)  # fmt: skip
    ledger_app.state.on_recovered = folder.metrics.recovered.inc
    ledger_app.state.snapshots = snapshots
    checkpoints = Path(ledger_app.app.conf.datadir) / "checkpoints"
    batch_max = settings.ledger.batch_max
    within_s = settings.ledger.batch_within_ms / 1000
    monitor = ledger_app.app.monitor
    lag_due = [0.0]
    forget_due = [time.monotonic() + FORGET_EVERY_S]

    async def fold(stream: Any) -> None:
        folder.start()
        queue = stream.channel.queue
        while True:
            batch = [await queue.get()]
            if queue.qsize() < batch_max:
                await asyncio.sleep(within_s)
            while len(batch) < batch_max:
                try:
                    batch.append(queue.get_nowait())
                except asyncio.QueueEmpty:
                    break
            fold_or_die(folder, batch)
            ack_batch(ledger_app.app.consumer, monitor, batch, folder.filled)
            if snapshots is not None:
                snapshots.maybe_take(ledger_app.state.open_partitions(), checkpoints)
            if time.monotonic() >= forget_due[0]:
                forget_due[0] = time.monotonic() + FORGET_EVERY_S
                ledger_app.state.forget_old_ids(folder.limits.idempotency_window_ms, FORGET_MAX)
            if time.monotonic() >= lag_due[0]:
                lag_due[0] = time.monotonic() + LAG_EVERY_S
                report_lag(folder, ledger_app.app.consumer)

    ledger_app.app.agent(ledger_app.commands, name="ledger-fold", concurrency=1)(fold)

    def on_rebalance(sender: Any, /, *args: Any, signal: Any, **kwargs: Any) -> None:
        # mode's Signal calls receiver(sender, partitions, signal=...)
        folder.forget(args[0] if args else ())

    ledger_app.app.on_partitions_revoked.connect(on_rebalance)
    ledger_app.app.on_partitions_assigned.connect(on_rebalance)
    return folder
