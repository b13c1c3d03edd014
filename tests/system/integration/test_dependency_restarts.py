"""Every long-running process rides out a restart of Postgres, of Redis and of Kafka.

The whole pipeline runs (ledger worker, outbox relay, both projectors, the proxy and the
credit store) under a load of calls through the official ``openai`` SDK, and one
dependency is stopped and started again in the middle. Afterwards every process is still
the one that was started (none exited), and the ledger equals an independent model of
what was sent: each call that succeeded charged once, each grant and purchase granted
once; the read models then equal the ledger (``verify``).
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from contracts.records import LEDGER_TOPIC
from kernel.settings import Settings
from stack import launcher
from testbed.ledger import WorkerGroup
from testbed.load import (
    GRANT,
    ONE_CALL,
    STARTER_PACK,
    Load,
    balances,
    buy_starter,
    grant,
    ledger_of,
    snapshots,
)
from testbed.proxy import wait_for
from testbed.store import StoreWorld, store_world
from testbed.topics import ScratchTopics


@pytest.fixture
def world(stack_settings: Settings, scratch: ScratchTopics, unique: str) -> Iterator[StoreWorld]:
    if stack_settings.postgres.external or stack_settings.redis.external \
            or stack_settings.kafka.external:  # fmt: skip
        pytest.fail("these tests restart Postgres, Redis and Kafka: they need the local "
                    "stack (`creditledger stack up`), not external services")  # fmt: skip
    # Calls retried through an outage are served again under their event id: allow more.
    with store_world(stack_settings, scratch, unique, start=False, ledger_topic=LEDGER_TOPIC,
                     proxy_settings={"retry_serves_max": 100}) as world:  # fmt: skip
        yield world


@pytest.mark.parametrize("service", ["postgres", "redis", "kafka"])
def test_every_process_rides_out_a_restart_and_the_ledger_equals_the_model(
    world: StoreWorld, stack_settings: Settings, unique: str, service: str
) -> None:
    workers = WorkerGroup(unique, world.env_settings())
    workers.start("w1", supervised=True)  # as deployed: `creditledger worker`
    try:
        world.start_upstream()  # a store world starts no model of its own
        world.start_proxy()
        world.start_relay()
        world.start_process("project-postgres", "project", "postgres")
        world.start_process("project-redis", "project", "redis")
        world.start_store()
        users = [f"{unique}-{service}-u{n}" for n in range(4)]
        grant(world, users)

        def accounts() -> dict[str, int]:
            return balances(world, users)

        wait_for("the grants in Postgres", lambda: len(accounts()) == len(users), 180, world)
        with Load(world, users) as load:
            time.sleep(3)
            launcher.down(stack_settings, only={service})
            time.sleep(4)
            launcher.up(stack_settings)
            time.sleep(5)
        assert not load.refused, load.refused[:5]
        for name, process in world.processes.items():
            assert process.poll() is None, f"{name} exited with {process.returncode} when " \
                f"{service} restarted:\n{world.log_tail(name)}"  # fmt: skip
        assert workers.alive("w1"), workers.tail("w1")
        # Money still moves through every path after the restart.
        buy_starter(world, users[0])
        expected = {u: GRANT - load.calls[u] * ONE_CALL for u in users}
        expected[users[0]] += STARTER_PACK
        assert all(n > 0 for n in load.calls.values()), load.calls

        try:
            wait_for("the read models equal the model", lambda: accounts() == expected, 240,
                     world)  # fmt: skip
        except AssertionError as exc:
            raise AssertionError(
                f"Postgres {accounts()} != model {expected} (calls {load.calls})"
            ) from exc
        ledger = ledger_of(stack_settings, set(users))
        model = {u: (expected[u], load.calls[u], load.calls[u]) for u in users}
        assert ledger == model  # each call charged exactly once, nothing else moved
        # The Redis projection too (the whole-topic `verify` does not apply here: the suite's
        # workers all fold into the one real ledger topic, each in a group of its own).
        wait_for("the snapshots equal the model", lambda: snapshots(world, users) == expected,
                 120, world)  # fmt: skip
    finally:
        workers.cleanup()
