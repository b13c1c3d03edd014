"""Reading a topic from its start to the end it has when the read begins.

Ops scans (balance, fold-check, dead letters) and ``verify`` read this way: a moving
target would never finish. Long scans show a progress bar on standard error.
"""

from __future__ import annotations

import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from confluent_kafka import TopicPartition
from tqdm import tqdm

from kernel.errors import StackError
from kernel.settings import Settings
from streams.kafka_clients import make_consumer

BATCH = 5000


@dataclass(frozen=True)
class Record:
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...] = ()


def _headers(raw: Any) -> tuple[tuple[str, bytes], ...]:
    """A consumed message's headers (a list of pairs, or None) as (name, bytes) pairs."""
    pairs = raw.items() if isinstance(raw, dict) else raw or ()
    return tuple((str(k), v.encode() if isinstance(v, str) else bytes(v or b""))
                 for k, v in pairs)  # fmt: skip


def read_topic(settings: Settings, topic: str, partitions: list[int] | None = None,
               progress: bool = False) -> Iterator[Record]:  # fmt: skip
    """Every record of ``topic`` (or of some partitions) up to the current end."""
    consumer = make_consumer(settings, f"{settings.kafka.client_id}-ops-{uuid.uuid4().hex[:8]}",
                             **{"enable.partition.eof": False})  # fmt: skip
    try:
        metadata = consumer.list_topics(topic, timeout=10).topics.get(topic)
        if metadata is None or metadata.error is not None:
            raise StackError(f"topic {topic} not found; run `creditledger topics apply`")
        wanted = sorted(metadata.partitions) if partitions is None else partitions
        ends: dict[int, int] = {}
        for partition in wanted:
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, partition), timeout=10)
            if high > low:
                ends[partition] = high
        total = sum(ends.values())
        if not ends:
            return
        consumer.assign([TopicPartition(topic, p, 0) for p in ends])
        done: set[int] = set()
        bar = tqdm(total=total, unit="rec", desc=topic, file=sys.stderr, disable=not progress,
                   mininterval=0.5)  # fmt: skip
        with bar:
            while len(done) < len(ends):
                batch = consumer.consume(num_messages=BATCH, timeout=1.0)
                for message in batch:
                    if message.error():
                        raise StackError(f"reading {topic}: {message.error()}")
                    partition, offset = message.partition(), message.offset()
                    if partition is None or offset is None:
                        continue
                    if partition in done or offset >= ends[partition]:
                        continue
                    yield Record(partition, offset, message.key(), message.value(),
                                 _headers(message.headers()))  # fmt: skip
                    if offset + 1 >= ends[partition]:
                        done.add(partition)
                bar.update(len(batch))
    finally:
        consumer.close()
