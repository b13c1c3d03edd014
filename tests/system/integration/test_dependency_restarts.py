"""Every long-running process rides out a restart of Postgres, of Redis and of Kafka.

The whole pipeline runs (ledger worker, outbox relay, both projectors, the proxy and the
credit store) under a load of calls through the official ``openai`` SDK, and one
dependency is stopped and started again in the middle. Afterwards every process is still
the one that was started (none exited), and the ledger equals an independent model of
what was sent: each call that succeeded charged once, each grant and purchase granted
once; the read models then equal the ledger (``verify``).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import openai
import pytest

from contracts.records import LEDGER_TOPIC, entry_from_record
from contracts.redis_keys import balance_key
from kernel.db import connect
from kernel.settings import Settings, project_path
from stack import launcher
from streams.codec import load_codec
from streams.reading import read_topic
from testbed.ledger import WorkerGroup
from testbed.proxy import wait_for
from testbed.store import StoreWorld, store_world
from testbed.topics import ScratchTopics
from tests.system.integration.test_proxy_flow import GRANT, ONE_CALL, PROMPT, grant

STARTER_PACK = 10_000_000  # store seed: the starter pack's credits


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


class Load:
    """Calls by several threads, each retried under its own event id until it succeeds."""

    def __init__(self, world: StoreWorld, users: list[str]) -> None:
        self.world, self.users = world, users
        self.calls = {user: 0 for user in users}
        self.refused: list[str] = []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(n,)) for n in range(4)]

    def __enter__(self) -> Load:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(180)

    def _run(self, worker: int) -> None:
        clients = {u: self.world.client(u) for u in self.users}
        n = 0
        while not self.stop.is_set():
            user = self.users[(worker + n) % len(self.users)]
            event_id = f"{self.users[0]}-w{worker}-{n}"  # unique across tests too
            n += 1
            if self._call(clients[user], event_id, streamed=n % 2 == 0):
                self.calls[user] += 1
            time.sleep(0.05)

    def _call(self, client: openai.OpenAI, event_id: str, *, streamed: bool) -> bool:
        deadline = time.monotonic() + 150
        while time.monotonic() < deadline:
            try:
                create = client.chat.completions.create
                headers = {"X-Billing-Event-Id": event_id}
                if streamed:
                    list(create(model="chat", messages=PROMPT, stream=True,
                                extra_headers=headers))  # fmt: skip
                else:
                    create(model="chat", messages=PROMPT, extra_headers=headers)
                return True
            except openai.APIStatusError as exc:
                if exc.status_code in (402, 409):
                    self.refused.append(f"{event_id}: {exc}")
                    return False
            except openai.APIError:
                pass  # the proxy is reachable again soon, or its answer broke: retry
            time.sleep(0.5)
        self.refused.append(f"{event_id}: no success in 150 s")
        return False


def buy_starter(world: StoreWorld, user: str) -> None:
    token = world.token(user)
    deadline = time.monotonic() + 60
    while True:
        status, order = world.call("POST", "/orders", token=token,
                                   body={"product_id": "starter"})  # fmt: skip
        if status == 201:
            break
        assert time.monotonic() < deadline, (status, order)
        time.sleep(0.5)
    path = f"/simulated-provider/orders/{order['order_id']}/checkout"
    status, paid = world.call("POST", path, token=token)
    assert status == 200, paid


def ledger_of(stack_settings: Settings, users: set[str]) -> dict[str, tuple[int, int, int]]:
    """user -> (balance, charges, distinct charge event ids), read from the ledger topic;
    an entry is identified by (user, seq), so a redelivered copy counts once."""
    codec = load_codec(project_path(stack_settings.schemas.avro_dir))
    entries = {}
    for record in read_topic(stack_settings, LEDGER_TOPIC):
        if record.key is None or record.key.decode() not in users:
            continue
        entry = entry_from_record(codec.decode(record.value, plain_times=True).record)
        entries[(entry.user_id, entry.seq)] = entry
    out = {}
    for user in users:
        mine = sorted((e for (u, _), e in entries.items() if u == user), key=lambda e: e.seq)
        assert [e.seq for e in mine] == list(range(1, len(mine) + 1)), f"{user}: seq gaps"
        charges = [e.event_id for e in mine if e.kind == "charge"]
        out[user] = (mine[-1].balance_after_micro, len(charges), len(set(charges)))
    return out


def snapshots(world: StoreWorld, users: list[str]) -> dict[str, int | None]:
    client = world.redis()
    try:
        values = [client.hget(balance_key(world.prefix, u), "balance_micro") for u in users]
    finally:
        client.close()
    return {u: None if v is None else int(str(v)) for u, v in zip(users, values, strict=True)}


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
            with connect(world.env_settings()) as conn:
                rows = conn.execute("SELECT user_id, balance_micro FROM accounts WHERE "
                                    "user_id = ANY(%s)", (users,)).fetchall()  # fmt: skip
            return {u: int(b) for u, b in rows}

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
