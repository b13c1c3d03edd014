"""The whole pipeline on a three-node cluster (production topic profile: 3 replicas, 2 in
sync) loses nothing when brokers die.

Proxy -> outbox -> relay -> ledger worker -> both projectors run under a load of calls
through the official ``openai`` SDK, with a purchase through the store in the middle. The
leader of a ledger partition is SIGKILLed, started again; later a second broker is too.
Afterwards the ledger equals an independent model of what was sent, ``verify`` finds the
read models equal to the fold of the ledger, and no partition is under-replicated.
How long each failure paused the ledger is measured by ``bench.cluster``, not here.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from contracts.records import LEDGER_TOPIC
from testbed.cluster import Cluster, LedgerClock
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
    start_pipeline,
)
from testbed.proxy import wait_for
from testbed.store import StoreWorld, store_world
from testbed.topics import ScratchTopics


@pytest.fixture
def world(cluster: Cluster, unique: str) -> Iterator[StoreWorld]:
    scratch = ScratchTopics(cluster.admin, unique)
    try:
        with store_world(cluster.settings, scratch, unique, start=False,
                         ledger_topic=LEDGER_TOPIC,
                         proxy_settings={"retry_serves_max": 100}) as world:  # fmt: skip
            yield world
    finally:
        scratch.cleanup()


def fail_and_recover(cluster: Cluster, clock: LedgerClock, node: int) -> None:
    """SIGKILL ``node``; the pipeline must go on with two; then start it again."""
    cluster.kill(node)
    clock.wait_for_entries(after=time.monotonic(), count=20, timeout_s=180)
    cluster.restart()
    cluster.wait_fully_replicated()


def test_killed_brokers_lose_nothing(world: StoreWorld, cluster: Cluster, unique: str) -> None:
    workers = WorkerGroup(unique, world.env_settings())
    try:
        start_pipeline(world, workers, supervised=True)
        users = [f"{unique}-cluster-u{n}" for n in range(4)]
        grant(world, users)

        def accounts() -> dict[str, int]:
            return balances(world, users)

        wait_for("the grants in Postgres", lambda: len(accounts()) == len(users), 180, world)
        with LedgerClock(cluster.settings, 6) as clock, Load(world, users) as load:
            clock.wait_for_entries(after=time.monotonic(), count=20, timeout_s=60)
            first = cluster.leader(LEDGER_TOPIC, 0)
            fail_and_recover(cluster, clock, first)
            buy_starter(world, users[0])  # a grant from the store, through the outbox
            second = next(cluster.leader(LEDGER_TOPIC, p) for p in range(6)
                          if cluster.leader(LEDGER_TOPIC, p) != first)  # fmt: skip
            fail_and_recover(cluster, clock, second)
            time.sleep(2)
        assert not load.refused, load.refused[:5]
        assert all(n > 0 for n in load.calls.values()), load.calls
        for name, process in world.processes.items():
            assert process.poll() is None, f"{name} exited:\n{world.log_tail(name)}"
        assert workers.alive("w1"), workers.tail("w1")

        expected = {u: GRANT - load.calls[u] * ONE_CALL for u in users}
        expected[users[0]] += STARTER_PACK
        try:
            wait_for("Postgres equals the model", lambda: accounts() == expected, 240, world)
        except AssertionError as exc:
            raise AssertionError(f"Postgres {accounts()} != model {expected}") from exc
        model = {u: (expected[u], load.calls[u], load.calls[u]) for u in users}
        assert ledger_of(world.env_settings(), set(users)) == model  # each call charged once
        wait_for("Redis equals the model", lambda: snapshots(world, users) == expected, 120,
                 world)  # fmt: skip
        verified = world.command("verify", "--quiet", "--max-lag-s", "120")
        assert verified.returncode == 0, verified.stdout + verified.stderr
        assert cluster.under_replicated() == []
    finally:
        workers.cleanup()
