"""The plaza's events earn credits: import -> plan.imported (outbox, relay, plaza topic) ->
the store's event rewards -> a reward grant (outbox, relay) -> the ledger worker -> the
author's balance in Redis and Postgres and the store's history. And the consumer killed
with SIGKILL mid-stream, again and again: every import by another user earns exactly one
reward, none beyond the cap, and the ledger equals a model built from the events."""

from __future__ import annotations

import random
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC

import pytest

from contracts.records import LEDGER_TOPIC, from_ms
from kernel.db import connect
from kernel.settings import Settings
from store.seed import REWARD_RULES
from testbed.ledger import WorkerGroup
from testbed.load import balances, entries_of, snapshots
from testbed.plaza import PlazaWorld, plaza_world
from testbed.proxy import wait_for
from testbed.topics import ScratchTopics

RULE = next(rule for rule in REWARD_RULES if rule["trigger_event"] == "plan.imported")
CAP, AMOUNT = RULE["cap_per_period"], RULE["amount_micro"]


@pytest.fixture
def world(stack_settings: Settings, scratch: ScratchTopics, unique: str) -> Iterator[PlazaWorld]:
    # The real ledger topic (the worker folds the real command topics into it).
    with plaza_world(stack_settings, scratch, unique, start=False,
                     ledger_topic=LEDGER_TOPIC) as world:  # fmt: skip
        yield world


def start_all(world: PlazaWorld, workers: WorkerGroup) -> None:
    workers.start("w1")
    world.start_relay()
    world.start_process("project-postgres", "project", "postgres")
    world.start_process("project-redis", "project", "redis")
    world.start_store()  # migrates and seeds the reward rules
    world.start_plaza()


def claims(world: PlazaWorld) -> list[tuple[str, str]]:
    with connect(world.env_settings()) as conn:
        rows = conn.execute("SELECT user_id, reference FROM reward_claims WHERE rule_id = %s",
                            (RULE["rule_id"],)).fetchall()  # fmt: skip
    return [(str(user), str(reference)) for user, reference in rows]


def test_an_import_earns_the_author_a_reward_in_every_read_model(world: PlazaWorld,
                                                                 unique: str) -> None:  # fmt: skip
    author, importer = f"{unique}-author", f"{unique}-importer"
    workers = WorkerGroup(unique, world.env_settings())
    try:
        start_all(world, workers)
        world.start_event_rewards()
        plan = world.publish(world.token(author), "Share me", tags=["sharing"])
        started = time.monotonic()
        assert world.plaza("POST", f"/plans/{plan['plan_id']}/import",
                           token=world.token(importer))[0] == 201  # fmt: skip
        assert (
            world.plaza("POST", f"/plans/{plan['plan_id']}/import", token=world.token(author))[0]
            == 201
        )  # fmt: skip  (own: nothing)
        token = world.token(author)
        wait_for("the reward in Redis", lambda: world.call("GET", "/balance", token=token)[1][
            "balance_micro"] == AMOUNT, 120, world)  # fmt: skip
        took = time.monotonic() - started
        wait_for("the reward in Postgres", lambda: balances(world, [author]) == {author: AMOUNT},
                 60, world)  # fmt: skip
        assert snapshots(world, [author, importer]) == {author: AMOUNT, importer: None}
        status, history = world.call("GET", "/ledger", token=token)
        assert status == 200
        [entry] = history["entries"]
        reference = f"plaza:import:{plan['plan_id']}:{importer}"
        assert (entry["kind"], entry["amount_micro"], entry["reference"]) == (
            "reward", AMOUNT, f"{RULE['rule_id']}:{reference}")  # fmt: skip
        print(f"import -> reward in Redis: {took:.2f} s")
    finally:
        workers.cleanup()


def test_the_consumer_killed_mid_stream_rewards_each_import_once_within_the_cap(
        world: PlazaWorld, unique: str) -> None:  # fmt: skip
    workers = WorkerGroup(unique, world.env_settings())
    rng = random.Random(17)
    authors = [f"{unique}-a{n}" for n in range(12)]
    importers = [f"{unique}-i{n}" for n in range(14)]
    try:
        start_all(world, workers)
        plans = {author: world.publish(world.token(author), f"Plan of {author}")["plan_id"]
                 for author in authors}  # fmt: skip
        # Author n's plan is imported by n + 1 users (1 .. 12: most go over the cap of 5),
        # some authors import their own, and likes and comments make the stream longer.
        calls = [
            ("POST", f"/plans/{plans[author]}/import", importer)
            for n, author in enumerate(authors)
            for importer in importers[: n + 1]
        ]
        calls += [("POST", f"/plans/{plans[author]}/import", author) for author in authors[::3]]
        calls += [("PUT", f"/plans/{plans[rng.choice(authors)]}/like", rng.choice(importers))
                  for _ in range(300)]  # fmt: skip
        rng.shuffle(calls)
        with ThreadPoolExecutor(8) as pool:
            statuses = list(pool.map(lambda c: world.plaza(c[0], c[1], token=world.token(c[2]))[0],
                                     calls))  # fmt: skip
        assert set(statuses) <= {200, 201}, Counter(statuses)
        events = [e for e in world.plaza_events() if e.type == "plan.imported"]
        assert len(events) == sum(range(1, 13)) + len(authors[::3])

        # The model, from the events alone: per author and UTC day of the import, the
        # imports by others, of which at most CAP earn a reward.
        others: Counter[tuple[str, object]] = Counter()
        for event in events:
            if event.actor_id != event.author_id:
                others[(event.author_id, from_ms(event.occurred_at_ms).astimezone(UTC).date())] += 1
        expected = Counter[str]()
        for (author, _day), count in others.items():
            expected[author] += min(count, CAP)
        total = sum(expected.values())

        # The stream is in the topic (the relay); now the consumer, killed three times, each
        # as soon as it has made a claim more. A consumer can finish the rest of the stream
        # between two looks, so a later kill may find it done: it is still killed and
        # restarted, and must then claim nothing more.
        world.start_event_rewards()
        mid_stream = 0
        for kill in range(3):
            done = len(claims(world))
            wait_for(f"claims past {done} (or all {total}) before kill {kill + 1}",
                     lambda d=done: len(claims(world)) > min(d, total - 1), 120, world,
                     poll_s=0.01)  # fmt: skip
            world.kill("event-rewards")
            mid_stream += len(claims(world)) < total
            world.start_event_rewards()
        print(f"{mid_stream} of 3 kills before the last claim")

        wait_for(f"{total} claims", lambda: len(claims(world)) >= total, 120, world)
        time.sleep(2)  # anything beyond the model would show up now
        made = claims(world)
        assert Counter(user for user, _ in made) == expected
        imports_by_others = {e.event_id for e in events if e.actor_id != e.author_id}
        assert {reference for _, reference in made} <= imports_by_others
        assert len({reference for _, reference in made}) == len(made)  # one per import

        # The ledger: exactly those rewards, each once, for the authors and no one else.
        wait_for("the rewards in Postgres", lambda: balances(world, authors) == {
            a: expected[a] * AMOUNT for a in authors if expected[a]}, 180, world)  # fmt: skip
        ledger = entries_of(world.stack_settings, set(authors) | set(importers))
        for user, entries in ledger.items():
            assert [e.kind for e in entries] == ["reward"] * expected[user], user
            assert len({e.event_id for e in entries}) == len(entries), user
            assert (entries[-1].balance_after_micro if entries else 0) == expected[user] * AMOUNT
        assert snapshots(world, authors) == {
            a: (expected[a] * AMOUNT if expected[a] else None) for a in authors}  # fmt: skip
    finally:
        workers.cleanup()
