"""What the pipeline tests and benchmarks drive and read: a load of calls through the
official ``openai`` SDK (each retried under its own event id until it succeeds), a
purchase through the store, and the ledger and snapshots of the users involved."""

from __future__ import annotations

import threading
import time

import openai
from openai.types.chat import ChatCompletionMessageParam

from contracts.cloudevents import command_headers
from contracts.commands import Entry, Grant
from contracts.records import GRANT_TOPIC, LEDGER_TOPIC, command_to_record, entry_from_record
from contracts.redis_keys import balance_key
from kernel.db import connect
from kernel.settings import Settings, project_path
from streams.codec import load_codec
from streams.kafka_clients import make_producer
from streams.reading import read_topic
from testbed.ledger import WorkerGroup
from testbed.proxy import ProxyWorld
from testbed.store import StoreWorld

PROMPT: list[ChatCompletionMessageParam] = [{"role": "user", "content": "count to five"}]
ONE_CALL = 10 * 6 + 20 * 5  # 6 prompt tokens, 5 output tokens at the test rule's prices
STARTER_PACK = 10_000_000  # store seed: the starter pack's credits
GRANT = 1_000_000


def grant(world: ProxyWorld, users: list[str], amount_micro: int = GRANT) -> None:
    producer = make_producer(world.env_settings())
    for user in users:
        command = Grant(event_id=f"grant-{user}", user_id=user, kind="purchase",
                        amount_micro=amount_micro, reference="test", note=None,
                        occurred_at_ms=int(time.time() * 1000), producer="test")  # fmt: skip
        value = world.codec.encode(GRANT_TOPIC, command_to_record(command))
        producer.produce(
            GRANT_TOPIC, key=user.encode(), value=value, headers=command_headers(command)
        )
    assert producer.flush(30) == 0


class Load:
    """Calls by several threads, each retried under its own event id until it succeeds."""

    def __init__(self, world: ProxyWorld, users: list[str], threads: int = 4,
                 pause_s: float = 0.05) -> None:  # fmt: skip
        self.world, self.users = world, users
        self.calls = {user: 0 for user in users}
        self.refused: list[str] = []
        # (monotonic start, seconds) of every successful call: the latency over time.
        self.latencies: list[tuple[float, float]] = []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(n,)) for n in range(threads)]
        self.pause_s = pause_s

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
            time.sleep(self.pause_s)

    def _call(self, client: openai.OpenAI, event_id: str, *, streamed: bool) -> bool:
        deadline = time.monotonic() + 150
        while time.monotonic() < deadline:
            try:
                create = client.chat.completions.create
                headers = {"X-Billing-Event-Id": event_id}
                t0 = time.monotonic()
                if streamed:
                    list(create(model="chat", messages=PROMPT, stream=True,
                                extra_headers=headers))  # fmt: skip
                else:
                    create(model="chat", messages=PROMPT, extra_headers=headers)
                self.latencies.append((t0, time.monotonic() - t0))
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


def buy_starter(world: StoreWorld, user: str, traceparent: str | None = None) -> None:
    """Order the starter pack and pay it at the simulated provider (whose checkout grants
    it; ``traceparent``: that request's W3C trace header)."""
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
    headers = {"traceparent": traceparent} if traceparent else None
    status, paid = world.call("POST", path, token=token, headers=headers)
    assert status == 200, paid


def entries_of(stack_settings: Settings, users: set[str]) -> dict[str, list[Entry]]:
    """user -> its entries in seq order, read from the ledger topic; an entry is identified
    by (user, seq), so a redelivered copy counts once, and a gap in seq fails."""
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
        out[user] = mine
    return out


def ledger_of(stack_settings: Settings, users: set[str]) -> dict[str, tuple[int, int, int]]:
    """user -> (balance, charges, distinct charge event ids), read from the ledger topic."""
    out = {}
    for user, mine in entries_of(stack_settings, users).items():
        charges = [e.event_id for e in mine if e.kind == "charge"]
        out[user] = (mine[-1].balance_after_micro, len(charges), len(set(charges)))
    return out


def snapshots(world: ProxyWorld, users: list[str]) -> dict[str, int | None]:
    client = world.redis()
    try:
        values = [client.hget(balance_key(world.prefix, u), "balance_micro") for u in users]
    finally:
        client.close()
    return {u: None if v is None else int(str(v)) for u, v in zip(users, values, strict=True)}


def balances(world: ProxyWorld, users: list[str]) -> dict[str, int]:
    """user -> balance in the world's Postgres read model (users it has no account for:
    absent)."""
    with connect(world.env_settings()) as conn:
        rows = conn.execute("SELECT user_id, balance_micro FROM accounts WHERE "
                            "user_id = ANY(%s)", (users,)).fetchall()  # fmt: skip
    return {str(u): int(b) for u, b in rows}


def start_pipeline(world: StoreWorld, workers: WorkerGroup, *,
                   supervised: bool = False) -> None:  # fmt: skip
    """Every part of the money path: a ledger worker, the fake upstream, the proxy, the
    relay, both projectors and the store (each with the world's and ``part_env``'s
    environment)."""
    workers.start("w1", supervised=supervised)
    world.start_upstream()
    world.start_proxy()
    world.start_relay()
    world.start_process("project-postgres", "project", "postgres")
    world.start_process("project-redis", "project", "redis")
    world.start_store()
