"""The outbox relay: events written to Postgres first, published to Kafka by relays.

Writers (the proxy when a call finishes; the credit store when an order is
paid) insert the encoded event in their own transaction with
:func:`outbox.enqueue.enqueue`, keyed by ``event_id``, so a retry adds nothing.
Relays (``creditledger outbox relay``; run several) publish pending rows:

1. lock a batch of pending rows, oldest first, ``FOR UPDATE SKIP LOCKED`` (two
   relays never take the same row);
2. produce them with the idempotent confluent-kafka producer (acks=all) and
   flush, requiring every ack;
3. mark the acked rows sent and commit.

A crash between 2 and 3 leaves the rows pending: they are sent again, and the
ledger folds the copy as a duplicate of the same ``event_id``. So every row
reaches Kafka at least once and the ledger applies it exactly once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psycopg

from contracts.cloudevents import kafka_headers
from kernel.db import connect
from kernel.errors import CreditLedgerError, StackError
from kernel.settings import Settings
from outbox import spool
from outbox.metrics import RelayMetrics
from streams.kafka_clients import make_producer

log = logging.getLogger(__name__)


@dataclass
class RelayStats:
    batches: int = 0
    sent: int = 0
    failures: int = 0


class OutboxRelay:
    def __init__(self, settings: Settings, *, dsn: str | None = None,
                 metrics: RelayMetrics | None = None) -> None:  # fmt: skip
        self.settings = settings
        self.dsn = dsn
        self.stats = RelayStats()
        self.metrics = metrics or RelayMetrics()
        self._next_housekeeping = 0.0
        self._conn: psycopg.Connection[Any] | None = None
        self._producer: Any = None

    def start(self) -> None:
        self._conn = connect(self.settings, dsn=self.dsn)
        self._producer = make_producer(self.settings)

    def close(self) -> None:
        if self._producer is not None:
            self._producer.flush(self.settings.outbox.flush_timeout_s)
            self._producer = None
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def pending(self) -> int:
        assert self._conn is not None
        row = self._conn.execute("SELECT count(*) FROM outbox WHERE sent_at IS NULL").fetchone()
        self._conn.commit()
        return int(row[0]) if row else 0

    def relay_batch(self) -> int:
        """Send one batch; the number of rows marked sent (0: nothing pending)."""
        conn, producer = self._conn, self._producer
        if conn is None or producer is None:
            raise CreditLedgerError("OutboxRelay used before start()")
        rows = conn.execute(
            "SELECT id, topic, message_key, message_value, headers FROM outbox "
            "WHERE sent_at IS NULL "
            "ORDER BY id LIMIT %s FOR UPDATE SKIP LOCKED",
            (self.settings.outbox.batch_max,),
        ).fetchall()
        if not rows:
            conn.commit()
            return 0
        acked: list[int] = []
        errors: list[str] = []

        def delivered(err: Any, _message: Any, row_id: int) -> None:
            if err is None:
                acked.append(row_id)
            else:
                errors.append(str(err))

        for row_id, topic, key, value, headers in rows:
            producer.produce(topic, key=bytes(key), value=bytes(value),
                             headers=kafka_headers(headers) if headers else None,
                             on_delivery=lambda e, m, i=row_id: delivered(e, m, i))  # fmt: skip
            producer.poll(0)
        producer.flush(self.settings.outbox.flush_timeout_s)
        if acked:
            conn.execute("UPDATE outbox SET sent_at = now() WHERE id = ANY(%s)", (acked,))
        conn.commit()
        self.stats.batches += 1
        self.stats.sent += len(acked)
        self.metrics.sent.inc(len(acked))
        if len(acked) < len(rows):
            self.stats.failures += len(rows) - len(acked)
            self.metrics.failures.inc(len(rows) - len(acked))
            raise StackError(f"outbox relay: {len(rows) - len(acked)} of {len(rows)} events not "
                             f"acked by Kafka ({errors[:1] or 'flush timed out'}); they stay "
                             "pending and are retried")  # fmt: skip
        return len(acked)

    def run(self, should_stop: Callable[[], bool]) -> RelayStats:
        idle_s = self.settings.outbox.poll_interval_ms / 1000
        while not should_stop():
            try:
                self.housekeeping()
                if self.relay_batch() == 0:
                    time.sleep(idle_s)
            except StackError as exc:
                log.warning("%s", exc)
                time.sleep(1.0)
            except psycopg.OperationalError as exc:
                log.warning("outbox relay lost Postgres (%s); reconnecting", exc)
                time.sleep(1.0)
                self._reconnect()
        return self.stats

    def housekeeping(self) -> None:
        """Once a second: drain the proxies' spool files, and measure the backlog."""
        if time.monotonic() < self._next_housekeeping:
            return
        self._next_housekeeping = time.monotonic() + 1.0
        assert self._conn is not None
        try:
            drained = spool.drain(
                self.settings.proxy.spool_dir,
                self._conn,
                lambda reason: self.metrics.spool_refused.labels(reason).inc(),
            )
        except spool.SpoolNotPrivate as exc:
            log.error("%s", exc)
            self.metrics.spool_refused.labels("not_private").inc()
            drained = 0
        self.metrics.spool_drained.inc(drained)
        self.metrics.backlog.set(self.pending())

    def _reconnect(self) -> None:
        try:
            if self._conn is not None:
                self._conn.close()
            self._conn = connect(self.settings, dsn=self.dsn)
        except StackError as exc:
            log.warning("outbox relay: %s", exc)
