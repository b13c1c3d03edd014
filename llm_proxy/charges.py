"""From a finished call to a durable ``credit.charge.requested`` event.

The charge is built by the call (:func:`llm_proxy.call.build_charge`: it carries the
rule id and version, the usage and the priced amount, so the fold never looks anything
up). :class:`ChargeWriter`, the call's ``ChargeSink``, makes it durable before the
call's response completes, trying in order:

1. the Postgres outbox (:func:`outbox.enqueue.enqueue_async`, with the call's
   fingerprint): the normal path; a relay publishes it. The same event id with the
   same fingerprint is a ``duplicate`` (a retry: nothing added); with another one it
   is :class:`~outbox.enqueue.OutboxConflict`, raised to the caller;
2. Kafka directly (idempotent producer, acks=all, waits for the ack) when
   Postgres is unreachable;
3. the local spool file (fsynced) when Kafka is unreachable too; the relay
   drains it into the outbox later.

The ledger dedups by ``event_id``, so an event that takes two of these paths
(a timeout after the write happened) is still charged once.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool

from contracts.cloudevents import current_trace, event_headers, kafka_headers
from contracts.commands import Charge
from contracts.records import CHARGE_TOPIC, command_to_record
from kernel.errors import StackError
from kernel.settings import Settings
from llm_proxy.ports import ChargePath
from outbox import spool
from outbox.enqueue import enqueue_async
from streams.codec import AvroCodec
from streams.kafka_clients import make_producer

log = logging.getLogger(__name__)


@dataclass
class WriterStats:
    outbox: int = 0
    duplicate: int = 0
    kafka: int = 0
    spool: int = 0


class ChargeWriter:
    def __init__(
        self, settings: Settings, codec: AvroCodec, pool: AsyncConnectionPool[Any]
    ) -> None:
        self.settings = settings
        self.codec = codec
        self.pool = pool
        self.stats = WriterStats()
        self._producer: Any = None
        self._poller: threading.Thread | None = None
        self._stop = threading.Event()

    def start(self) -> None:
        # librdkafka connects in the background; a down broker does not block the start.
        self._producer = make_producer(self.settings, **{"linger.ms": 0})
        self._poller = threading.Thread(target=self._poll, name="charge-producer", daemon=True)
        self._poller.start()

    def _poll(self) -> None:
        while not self._stop.is_set():
            self._producer.poll(0.05)

    def close(self) -> None:
        self._stop.set()
        if self._poller is not None:
            self._poller.join()
        if self._producer is not None:
            self._producer.flush(self.settings.proxy.direct_produce_timeout_s)

    async def write(self, charge: Charge, fingerprint: str) -> ChargePath:
        """Make ``charge`` durable; which path took it. Raises OSError if even the spool
        fails, and OutboxConflict if its event id is the outbox's already for another call.

        ``fingerprint`` is the call's (see the guard): a retry of the same call finds its
        first charge and adds nothing."""
        key = charge.user_id.encode()
        value = self.codec.encode(CHARGE_TOPIC, command_to_record(charge))
        headers = event_headers(charge.event_id, CHARGE_TOPIC, charge.producer,
                                charge.occurred_at_ms, current_trace.get())  # fmt: skip
        try:
            async with self.pool.connection(timeout=2.0) as conn:
                enqueued = await enqueue_async(conn, charge.event_id, CHARGE_TOPIC, key, value,
                                               fingerprint, headers)  # fmt: skip
            if enqueued == "inserted":
                self.stats.outbox += 1
                return "outbox"
            self.stats.duplicate += 1
            return "duplicate"
        except (psycopg.Error, TimeoutError, OSError) as exc:
            log.warning("charge %s: outbox unavailable (%s); producing directly",
                        charge.event_id, exc)  # fmt: skip
        try:
            await self._produce(key, value, headers)
            self.stats.kafka += 1
            return "kafka"
        except (KafkaUnavailable, BufferError) as exc:
            log.error("charge %s: Kafka unavailable too (%s); spooling to %s",
                      charge.event_id, exc, self.settings.proxy.spool_dir)  # fmt: skip
        event = spool.SpooledEvent(charge.event_id, CHARGE_TOPIC, key, value, fingerprint,
                                   headers)  # fmt: skip
        await asyncio.to_thread(spool.append, self.settings.proxy.spool_dir, event)
        self.stats.spool += 1
        return "spool"

    async def _produce(self, key: bytes, value: bytes, headers: dict[str, str]) -> None:
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()

        def delivered(err: Any, _message: Any) -> None:
            def settle() -> None:
                if done.done():
                    return
                if err is None:
                    done.set_result(None)
                else:
                    done.set_exception(KafkaUnavailable(str(err)))

            loop.call_soon_threadsafe(settle)

        # A short delivery timeout of its own: this path runs while a caller waits.
        self._producer.produce(
            CHARGE_TOPIC,
            key=key,
            value=value,
            headers=kafka_headers(headers),
            on_delivery=delivered,
        )
        timeout = self.settings.proxy.direct_produce_timeout_s
        try:
            await asyncio.wait_for(done, timeout)
        except TimeoutError as exc:
            # The message may still be delivered later; if it is, and the spool copy is
            # drained too, the ledger folds the second one as a duplicate.
            raise KafkaUnavailable(f"no ack within {timeout} s") from exc


class KafkaUnavailable(StackError):
    """Kafka did not ack a directly produced charge."""
