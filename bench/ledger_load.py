"""Loading the ledger for the benchmarks: commands (the tests' generator), producing them,
a consumer group started at the end of the command topics, and a tail of the ledger that
says when a run's entries appear. Shared by ``bench.ledger``, ``bench.ledger_recovery``
and the benchmarks that fold through a worker."""

from __future__ import annotations

import sys
import time
import uuid
from collections.abc import Iterator

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition
from tqdm import tqdm

from contracts.commands import Command
from contracts.records import (
    CHARGE_TOPIC,
    GRANT_TOPIC,
    LEDGER_TOPIC,
    command_to_record,
    command_topic,
)
from kernel.settings import Settings
from streams.codec import AvroCodec
from streams.kafka_clients import consumer_config, make_consumer, make_producer
from testbed.workload import command_stream


def commands(prefix: str, count: int, users: int, seed: int = 1) -> Iterator[Command]:
    """The tests' generator (testbed.workload), lazily: the same commands as any test's."""
    return command_stream(prefix, count, users, seed, producer="bench")


def produce(settings: Settings, codec: AvroCodec, items: Iterator[Command], total: int,
            desc: str) -> None:  # fmt: skip
    producer = make_producer(settings, **{"linger.ms": 20, "batch.size": 1_000_000})
    for command in tqdm(items, total=total, desc=desc, unit="cmd", file=sys.stderr,
                        mininterval=1):  # fmt: skip
        topic = command_topic(command)
        value = codec.encode(topic, command_to_record(command))
        while True:
            try:
                producer.produce(topic, key=command.user_id.encode(), value=value)
                break
            except BufferError:
                producer.poll(0.05)
        producer.poll(0)
    if producer.flush(120):
        raise SystemExit("commands not delivered")


def start_group_at_end(settings: Settings, group: str) -> None:
    """Commit the new group's offsets at the end of the command topics."""
    consumer = Consumer(consumer_config(settings, group))
    offsets = []
    for topic in (CHARGE_TOPIC, GRANT_TOPIC):
        for partition in consumer.list_topics(topic, timeout=10).topics[topic].partitions:
            _low, high = consumer.get_watermark_offsets(TopicPartition(topic, partition))
            offsets.append(TopicPartition(topic, partition, high))
    deadline = time.monotonic() + 60
    while True:
        try:
            consumer.commit(offsets=offsets, asynchronous=False)
            break
        except KafkaException as exc:
            # A fresh cluster's group coordinator may still be moving or loading.
            moving = (KafkaError.NOT_COORDINATOR, KafkaError.COORDINATOR_LOAD_IN_PROGRESS,
                      KafkaError.COORDINATOR_NOT_AVAILABLE)  # fmt: skip
            if exc.args[0].code() not in moving or time.monotonic() > deadline:
                raise
            time.sleep(0.5)
    consumer.close()


class LedgerTail:
    """Follows the ledger from its current end; reports when entries of a prefix appear."""

    def __init__(self, settings: Settings, codec: AvroCodec, prefix: str) -> None:
        self.codec = codec
        self.prefix = prefix.encode()
        self.consumer = make_consumer(settings, f"bench-tail-{uuid.uuid4().hex[:8]}",
                                      **{"fetch.wait.max.ms": 5})  # fmt: skip
        parts = self.consumer.list_topics(LEDGER_TOPIC, timeout=10).topics[LEDGER_TOPIC].partitions
        assignment = []
        for partition in parts:
            _low, high = self.consumer.get_watermark_offsets(TopicPartition(LEDGER_TOPIC,
                                                                            partition))  # fmt: skip
            assignment.append(TopicPartition(LEDGER_TOPIC, partition, high))
        self.consumer.assign(assignment)

    def poll(self, timeout_s: float = 0.05) -> list[tuple[float, bytes]]:
        """(seen_at, event_id) of this prefix's new entries."""
        seen: list[tuple[float, bytes]] = []
        for message in self.consumer.consume(num_messages=10_000, timeout=timeout_s):
            if message.error() or not (message.key() or b"").startswith(self.prefix):
                continue
            record = self.codec.decode(message.value(), expected=LEDGER_TOPIC).record
            seen.append((time.monotonic(), record["event_id"].encode()))
        return seen

    def close(self) -> None:
        self.consumer.close()
