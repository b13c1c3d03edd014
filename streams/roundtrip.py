"""Send one event of each type through real Kafka and read it back, decoded.

The walking skeleton's proof that contracts, codec, partitioner and broker fit
together; the demo prints its table and the integration tests assert on it.
It goes through a throw-away topic, never the real ones: a sample entry in
``credit.ledger.entries`` would be a fake fact in the ledger.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, cast

from confluent_kafka import KafkaError, KafkaException, Message, TopicPartition

from kernel.errors import StackError
from kernel.settings import Settings
from streams.codec import AvroCodec
from streams.kafka_clients import make_consumer, make_producer


@dataclass(frozen=True)
class RoundTrip:
    event_type: str
    key: str
    partition: int
    offset: int
    size_bytes: int
    milliseconds: float
    equal: bool


def _delivered(producer: Any, topic: str, key: str, value: bytes, timeout_s: float) -> Message:
    reports: list[tuple[KafkaError | None, Message]] = []
    producer.produce(topic, key=key.encode(), value=value,
                     on_delivery=lambda err, msg: reports.append((err, msg)))  # fmt: skip
    remaining = producer.flush(timeout_s)
    if remaining or not reports:
        raise StackError(f"{topic}: no delivery report within {timeout_s:.0f} s; is Kafka up?")
    error, message = reports[0]
    if error is not None:
        raise StackError(f"{topic}: delivery failed: {error}")
    return message


def _read_at(consumer: Any, topic: str, partition: int, offset: int, timeout_s: float) -> Message:
    consumer.assign([TopicPartition(topic, partition, offset)])
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        message = consumer.poll(0.5)
        if message is None:
            continue
        if message.error():
            raise KafkaException(message.error())
        if message.offset() == offset:
            return cast(Message, message)
    raise StackError(f"{topic}[{partition}]@{offset} not readable within {timeout_s:.0f} s")


def round_trip(
    settings: Settings,
    codec: AvroCodec,
    events: dict[str, dict[str, Any]],
    topic: str,
    timeout_s: float = 30,
) -> list[RoundTrip]:
    """Produce each event to ``topic`` (a scratch topic), consume it back, compare."""
    producer = make_producer(settings)
    results: list[RoundTrip] = []
    for event_type, record in events.items():
        key = str(record.get("user_id") or event_type)
        value = codec.encode(event_type, record)
        started = time.perf_counter()
        sent = _delivered(producer, topic, key, value, timeout_s)
        partition, offset = sent.partition(), sent.offset()
        if partition is None or offset is None:
            raise StackError(f"{event_type}: delivery report without partition/offset")
        # A fresh consumer per topic: re-assigning a used librdkafka consumer costs
        # about a second of fetcher back-off, which would swamp the measurement.
        # A short fetch wait, too: single messages, latency matters more than batching.
        consumer = make_consumer(
            settings, group_id=f"{settings.kafka.client_id}-roundtrip", **{"fetch.wait.max.ms": 10}
        )
        try:
            received = _read_at(consumer, topic, partition, offset, timeout_s)
        finally:
            consumer.close()
        decoded = codec.decode(received.value(), expected=event_type)
        elapsed_ms = (time.perf_counter() - started) * 1000
        results.append(
            RoundTrip(
                event_type=event_type,
                key=key,
                partition=partition,
                offset=offset,
                size_bytes=len(value),
                milliseconds=elapsed_ms,
                equal=decoded.record == record and received.key() == key.encode(),
            )
        )
    return results
