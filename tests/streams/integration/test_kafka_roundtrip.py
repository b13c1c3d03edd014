"""Every event type through real Kafka with the codec, and bad bytes seen as such."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from confluent_kafka import TopicPartition

from kernel.errors import MalformedMessageError, UnknownSchemaError
from kernel.settings import Settings
from streams.codec import AvroCodec
from streams.examples import example_events
from streams.kafka_clients import make_consumer, make_producer
from streams.roundtrip import round_trip
from testbed.topics import ScratchTopics


def test_every_event_type_round_trips(
    stack_settings: Settings, scratch: ScratchTopics, codec: AvroCodec, unique: str
) -> None:
    topic = scratch.create("roundtrip", partitions=3)
    at = datetime.now(UTC).replace(microsecond=0)
    events = example_events(user_id=f"it-{unique}", at=at, suffix=unique)
    results = round_trip(stack_settings, codec, events, topic=topic)
    assert [r.event_type for r in results] == list(events)
    for result in results:
        assert result.equal, result
        assert 0 <= result.partition < 3


@pytest.mark.parametrize(
    ("value", "error"),
    [
        (b'{"user_id": "u1", "amount": 1.5}', MalformedMessageError),
        (b"\xc3\x01" + b"\xff" * 8 + b"\x02", UnknownSchemaError),
    ],
)
def test_bad_bytes_from_kafka_fail_with_context(
    stack_settings: Settings,
    scratch: ScratchTopics,
    codec: AvroCodec,
    value: bytes,
    error: type[Exception],
) -> None:
    # A scratch topic: junk on the real command topics would reach the ledger's DLQ.
    topic = scratch.create("bad-bytes", partitions=1)
    producer = make_producer(stack_settings)
    delivered = []
    producer.produce(topic, key=b"bad-bytes", value=value,
                     on_delivery=lambda err, msg: delivered.append((err, msg)))  # fmt: skip
    assert producer.flush(30) == 0
    err, sent = delivered[0]
    assert err is None
    consumer = make_consumer(stack_settings, "it-bad-bytes")
    try:
        partition, offset = sent.partition(), sent.offset()
        assert partition is not None
        assert offset is not None
        consumer.assign([TopicPartition(topic, partition, offset)])
        message = None
        for _ in range(60):
            message = consumer.poll(0.5)
            if message is not None and not message.error():
                break
        assert message is not None
        assert message.value() == value
        with pytest.raises(error) as caught:
            codec.decode(message.value(), expected="credit.grant.requested")
        assert f"{len(value)} bytes" in str(caught.value)
    finally:
        consumer.close()
