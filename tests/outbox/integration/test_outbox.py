"""The outbox relay: every row reaches Kafka at least once, whatever is killed when."""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from agents.domain import Ledger
from contracts.commands import Grant
from contracts.records import CHARGE_TOPIC, command_from_record, command_to_record, command_topic
from kernel.db import connect
from kernel.errors import OutboxConflict
from kernel.settings import Settings, project_path
from outbox.enqueue import enqueue, enqueue_async
from streams.codec import load_codec
from streams.reading import read_topic
from testbed.topics import ScratchTopics
from testbed.workload import FRESH_T0_MS, Auditor, random_command
from testbed.world import World


@pytest.fixture
def world(stack_settings: Settings, scratch: ScratchTopics, unique: str) -> Iterator[World]:
    codec = load_codec(project_path(stack_settings.schemas.avro_dir))
    env = World(stack_settings, scratch, unique, codec)
    yield env
    env.cleanup()


def test_relays_killed_three_times_lose_nothing_and_the_fold_doubles_nothing(
    world: World,
) -> None:
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    users = [f"{world.unique}-u{n}" for n in range(200)]
    commands = [random_command(rng, f"{world.unique}-ev{n}", rng.choice(users),
                               FRESH_T0_MS + n) for n in range(6000)]  # fmt: skip
    auditor = Auditor(max_amount_micro=10**12)
    for command in commands:
        auditor.apply(command)

    failed: list[BaseException] = []  # the writer thread's failure fails the test

    def write() -> None:
        try:
            with connect(world.settings) as conn:
                for start in range(0, len(commands), 100):
                    for command in commands[start : start + 100]:
                        value = world.codec.encode(command_topic(command),
                                                   command_to_record(command))  # fmt: skip
                        assert enqueue(conn, command.event_id, world.topic,
                                       command.user_id.encode(), value) == "inserted"  # fmt: skip
                    conn.commit()
                    time.sleep(0.01)
                # A retried call with the same event_id adds nothing.
                first = commands[0]
                again = world.codec.encode(command_topic(first), command_to_record(first))
                assert enqueue(conn, first.event_id, world.topic, first.user_id.encode(),
                               again) == "duplicate"  # fmt: skip
                conn.commit()
        except BaseException as exc:
            failed.append(exc)

    world.start_relay("relay-a")
    world.start_relay("relay-b")
    writer = threading.Thread(target=write)
    writer.start()
    try:
        for _round in range(3):
            time.sleep(rng.uniform(0.3, 1.0))
            world.kill("relay-a")
            world.start_relay("relay-a")
        writer.join()
        if failed:
            raise failed[0]
        deadline = time.monotonic() + 120
        while True:
            with connect(world.settings) as conn:
                row = conn.execute("SELECT count(*) FROM outbox WHERE sent_at IS NULL").fetchone()
            if row is not None and row[0] == 0:
                break
            assert time.monotonic() < deadline, (
                f"seed {seed}: outbox not drained\n{world.log_tail()}"
            )
            time.sleep(0.2)
    finally:
        world.stop_all()

    sent = [world.codec.decode(record.value) for record in read_topic(world.settings, world.topic)]
    ids = [decoded.record["event_id"] for decoded in sent]
    assert set(ids) == {c.event_id for c in commands}, f"seed {seed}: events lost or unknown"
    # Re-sent copies (a relay killed after Kafka acked, before its commit) fold as duplicates.
    ledger = Ledger()
    for decoded in sent:
        ledger.apply(command_from_record(decoded.event_type, decoded.record), 0)
    balances = {user: account.balance_micro for user, account in ledger.accounts.items()}
    assert balances == auditor.balance, f"seed {seed}: the fold differs from the auditor"
    assert sum(1 for d in sent if d.event_type == CHARGE_TOPIC) >= sum(
        1 for c in commands if command_topic(c) == CHARGE_TOPIC)  # fmt: skip


def test_the_spool_moves_only_charges_into_the_outbox(world: World, tmp_path: Path) -> None:
    """A local user who can write spool lines must not be able to grant credits: the relay
    takes only charges from the spool, and a reused event id is refused, not swallowed."""
    from outbox import spool

    codec = world.codec
    charge = random_command(random.Random(1), "spooled-charge", "spool-u", FRESH_T0_MS)
    while command_topic(charge) != CHARGE_TOPIC:
        charge = random_command(random.Random(), "spooled-charge", "spool-u", FRESH_T0_MS)
    grant = Grant(event_id="spooled-grant", user_id="spool-u", kind="purchase",
                  amount_micro=10**12, reference="forged", note=None, occurred_at_ms=1,
                  producer="attacker")  # fmt: skip
    directory = tmp_path / "spool"
    for command in (charge, grant):
        topic = command_topic(command)
        value = codec.encode(topic, command_to_record(command))
        spool.append(directory, spool.SpooledEvent(command.event_id, topic, b"spool-u", value))
    # And a charge line whose id the outbox holds already for another event.
    with connect(world.settings) as conn:
        enqueue(conn, "taken-id", CHARGE_TOPIC, b"k", b"the first event")
        conn.commit()
    spool.append(directory, spool.SpooledEvent("taken-id", CHARGE_TOPIC, b"k", b"another"))
    refused: list[str] = []
    with connect(world.settings) as conn:
        assert spool.drain(directory, conn, refused.append) == 3
        rows = conn.execute("SELECT event_id, message_value FROM outbox ORDER BY id").fetchall()
    assert sorted(refused) == ["conflict", "not_a_charge"]
    assert [(e, bytes(v)) for e, v in rows] == [
        ("taken-id", b"the first event"),
        (charge.event_id, codec.encode(CHARGE_TOPIC, command_to_record(charge))),
    ]
    assert list(directory.iterdir()) == []


def test_many_events_in_one_statement_answer_as_one_by_one(world: World) -> None:
    """enqueue_many_async: new events inserted in order, the same event again a duplicate,
    an id taken by another event an OutboxConflict that leaves the transaction's rows out."""
    from outbox.enqueue import enqueue_many_async

    headers = {"ce_id": "x"}

    async def run() -> None:
        dsn = world.settings.postgres_dsn
        async with await psycopg.AsyncConnection.connect(dsn) as conn:
            async with conn.transaction():
                await enqueue_async(conn, "e-0", "t", b"k", b"zero")
                outcomes = await enqueue_many_async(conn, [
                    ("e-1", "t", b"k1", b"one", headers), ("e-0", "t", b"k", b"zero", headers),
                    ("e-2", "t", b"k2", b"two", headers)])  # fmt: skip
                assert outcomes == ["inserted", "duplicate", "inserted"]
            with pytest.raises(OutboxConflict):
                async with conn.transaction():
                    taken = [
                        ("e-3", "t", b"k", b"three", headers),
                        ("e-1", "t", b"k", b"x", headers),
                    ]
                    await enqueue_many_async(conn, taken)
            with pytest.raises(ValueError):
                await enqueue_many_async(conn, [("e-4", "t", b"k", b"a", headers)] * 2)
            cursor = await conn.execute("SELECT event_id, message_value, headers FROM outbox "
                                        "ORDER BY id")  # fmt: skip
            rows = [(e, bytes(v), h) for e, v, h in await cursor.fetchall()]
        assert rows == [("e-0", b"zero", None), ("e-1", b"one", headers), ("e-2", b"two", headers)]

    asyncio.run(run())
