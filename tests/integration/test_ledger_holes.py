"""The agent's defence against faust-streaming skipping a message (see agents/ledger_agent.py).

Reproduces what Faust did in a rebalance: the group's committed offset is X,
but the first message handed to the agent is X+2. The agent must read X and
X+1 from Kafka itself and fold them first, in order.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from confluent_kafka import Consumer, TopicPartition

from agents.ledger_agent import Incoming, LedgerFolder
from agents.records import GRANT_TOPIC, command_to_record
from creditledger.settings import Settings, load_settings
from streams.app import build_ledger_app
from streams.codec import AvroCodec
from streams.kafka_clients import consumer_config, partition_of
from streams.topics import TopicsSpec
from tests.integration.ledger_harness import send
from tests.unit.test_domain import grant
from tests.workload import Message


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
    commands = [grant(event_id=f"{user}-{n}", user_id=user, amount_micro=n + 1) for n in range(4)]
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
    commands = [grant(event_id=f"{user}-{n}", user_id=user) for n in range(3)]
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
