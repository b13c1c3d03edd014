"""The agent's defence against faust-streaming skipping a message (see agents/ledger_agent.py).

Reproduces what Faust did in a rebalance: the group's committed offset is X,
but the first message handed to the agent is X+2. The agent must read X and
X+1 from Kafka itself and fold them first, in order.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from confluent_kafka import Consumer, TopicPartition
from faust.types import TP

from agents.app import build_ledger_app
from agents.ledger_agent import Incoming, LedgerFolder, ack_batch, register_ledger_agent
from contracts.records import GRANT_TOPIC, command_to_record
from kernel.settings import Settings, load_settings
from streams.codec import AvroCodec
from streams.kafka_clients import consumer_config, partition_of
from streams.topics import TopicsSpec
from testbed.ledger import send
from testbed.workload import FRESH_T0_MS, Message
from tests.agents.unit.test_domain import grant


@pytest.fixture
def folder(stack_settings: Settings, project_topics: TopicsSpec,
           unique: str) -> Iterator[LedgerFolder]:  # fmt: skip
    settings = load_settings(ledger={"app_id": f"test-holes-{unique}"})
    app = build_ledger_app(settings, worker_name="holes", store="memory://",
                           data_dir=None)  # fmt: skip
    folder = LedgerFolder(settings, app.codec, app.state, app.partitions, "holes")
    folder.start()
    yield folder
    folder._reader.close()


def _commit(settings: Settings, group: str, topic: str, partition: int, offset: int) -> None:
    consumer = Consumer(consumer_config(settings, group))
    consumer.commit(offsets=[TopicPartition(topic, partition, offset)], asynchronous=False)
    consumer.close()


def test_a_skipped_head_is_read_back_and_put_first(
    folder: LedgerFolder, codec: AvroCodec, unique: str
) -> None:
    user = f"holes-{unique}"
    commands = [
        grant(event_id=f"{user}-{n}", user_id=user, amount_micro=n + 1, occurred_at_ms=FRESH_T0_MS)
        for n in range(4)
    ]
    messages = [Message(GRANT_TOPIC, user.encode(),
                        codec.encode(GRANT_TOPIC, command_to_record(c)), "applied")
                for c in commands]  # fmt: skip
    delivered = send(folder.settings, messages)
    partition = delivered[0].partition
    assert partition == partition_of(user, folder.partitions)
    offsets = [d.offset for d in delivered]
    assert offsets == list(range(offsets[0], offsets[0] + 4))
    _commit(folder.settings, folder.settings.ledger.app_id, GRANT_TOPIC, partition, offsets[0])

    third = Incoming(GRANT_TOPIC, partition, offsets[2], user.encode(), messages[2].value, 1)
    fourth = Incoming(GRANT_TOPIC, partition, offsets[3], user.encode(), messages[3].value, 2)
    filled = folder.with_holes_filled([third, fourth])

    assert [item.offset for item in filled] == offsets
    assert [item.value for item in filled] == [m.value for m in messages]
    assert folder.stats.gap_filled == 2


def test_a_hole_in_the_middle_is_filled_and_redeliveries_pass(
    folder: LedgerFolder, codec: AvroCodec, unique: str
) -> None:
    user = f"holes2-{unique}"
    commands = [
        grant(event_id=f"{user}-{n}", user_id=user, occurred_at_ms=FRESH_T0_MS) for n in range(3)
    ]
    messages = [Message(GRANT_TOPIC, user.encode(),
                        codec.encode(GRANT_TOPIC, command_to_record(c)), "applied")
                for c in commands]  # fmt: skip
    delivered = send(folder.settings, messages)
    partition, first = delivered[0].partition, delivered[0].offset
    _commit(folder.settings, folder.settings.ledger.app_id, GRANT_TOPIC, partition, first)
    items = [Incoming(GRANT_TOPIC, partition, d.offset, user.encode(), d.message.value, 1)
             for d in delivered]  # fmt: skip

    in_order = folder.with_holes_filled([items[0]])
    skipped = folder.with_holes_filled([items[2]])
    again = folder.with_holes_filled([items[0]])  # a redelivery: passed on, nothing filled

    assert [i.offset for i in in_order] == [first]
    assert [i.offset for i in skipped] == [first + 1, first + 2]
    assert [i.offset for i in again] == [first]
    assert folder.stats.gap_filled == 1


@dataclass(eq=False)
class FaustMessage:
    """The fields of a Faust message that the agent and ``Consumer.ack`` read."""

    topic: str
    partition: int
    offset: int
    key: bytes
    value: bytes
    timestamp: float = 1.0
    acked: bool = False
    headers: list[tuple[str, bytes]] = field(default_factory=list)

    @property
    def tp(self) -> TP:
        return TP(self.topic, self.partition)


@dataclass(eq=False)
class FaustEvent:
    message: FaustMessage
    consumer: Any

    def ack(self) -> None:
        self.consumer.ack(self.message)


def test_a_filled_hole_is_acked_so_faust_commits_up_to_the_end(
    stack_settings: Settings, project_topics: TopicsSpec, codec: AvroCodec, unique: str
) -> None:
    """Faust skipped offsets C and C+1 and delivered C+2, C+3. The agent folds all four;
    Faust's own consumer (the real object, whose ``_new_offset`` decides every commit)
    must then commit C+4, the end, not stay at C for as long as the worker runs."""
    settings = load_settings(ledger={"app_id": f"test-holes-ack-{unique}"})
    app = build_ledger_app(settings, worker_name="holes-ack", store="memory://",
                           data_dir=None)  # fmt: skip
    folder = register_ledger_agent(app, settings, "holes-ack")
    folder.start()
    try:
        user = f"holes3-{unique}"
        commands = [
            grant(event_id=f"{user}-{n}", user_id=user, occurred_at_ms=FRESH_T0_MS)
            for n in range(4)
        ]
        messages = [Message(GRANT_TOPIC, user.encode(),
                            codec.encode(GRANT_TOPIC, command_to_record(c)), "applied")
                    for c in commands]  # fmt: skip
        delivered = send(settings, messages)
        partition, first = delivered[0].partition, delivered[0].offset
        _commit(settings, settings.ledger.app_id, GRANT_TOPIC, partition, first)
        consumer: Any = app.app.consumer  # Faust's private bookkeeping is what is tested
        topics: Any = app.app.topics
        # What the started worker has: acks on for the agent's topic, and the committed
        # offset Faust read at assignment.
        topics._acking_topics.add(GRANT_TOPIC)
        tp = TP(GRANT_TOPIC, partition)
        consumer._committed_offset[tp] = first
        events = [FaustEvent(FaustMessage(GRANT_TOPIC, partition, d.offset, d.message.key,
                                          d.message.value), consumer)
                  for d in delivered[2:]]  # fmt: skip
        folded = folder.with_holes_filled([Incoming.from_faust(e) for e in events])
        assert [i.offset for i in folded] == [first, first + 1, first + 2, first + 3]

        ack_batch(consumer, app.app.monitor, events, [])
        assert consumer._new_offset(tp) is None  # the delivered ones alone: stuck at C
        ack_batch(consumer, app.app.monitor, [], folder.filled)
        assert consumer._new_offset(tp) == first + 4  # committed offset == end
    finally:
        folder._reader.close()
