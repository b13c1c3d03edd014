"""The store's fast path for balance, consumption and ledger (store/hot_reads.py).

It must change speed, never behaviour:

- two real store processes on the same data, one with ``store.fast_reads`` off,
  answer every request (good ones and bad ones) with the same status, content
  type and bytes;
- in-process, against the real read models, it answers well-formed requests
  itself and hands every other one to the app behind it untouched.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest

from contracts.commands import Entry
from kernel.settings import Settings
from projections.queries import ReadModels
from store.hot_reads import HotReads
from testbed.asgi import HANDED_ON, Downstream, http_scope, status_of
from testbed.proxy import free_port
from testbed.store import TOKEN_SECRET, StoreWorld, store_world
from testbed.topics import ScratchTopics
from testbed.world import Writer

DAY_MS = 86_400_000


@pytest.fixture
def world(stack_settings: Settings, scratch: ScratchTopics, unique: str) -> Iterator[StoreWorld]:
    with store_world(stack_settings, scratch, unique, start=False) as world:
        settings = world.env_settings()
        writer = Writer(settings, settings.projections.ledger_topic, world.codec)
        now = int(time.time() * 1000)
        entries: list[Entry] = [
            writer.entry("alice", 90_000_000, now - 40 * DAY_MS, kind="purchase"),
            writer.entry("bob", 5_000_000, now - 2 * DAY_MS, kind="purchase"),
            writer.entry("bob", 1_234, now - 3_600_000, model="m2"),
        ]
        for n in range(45):  # charges over 45 days, two models: every period has some
            entries.append(writer.entry("alice", 1_000 + n, now - n * DAY_MS,
                                        model="m1" if n % 3 else "m2"))  # fmt: skip
        writer.apply(entries)
        yield world


def away_from_the_hour() -> None:
    """Both stores must see the same current hour (the windows end with it)."""
    now = datetime.now(UTC)
    if now.minute == 59 and now.second >= 40:
        time.sleep(61 - now.second)


def test_fast_reads_answer_byte_for_byte_as_the_routes(world: StoreWorld) -> None:
    routes_url = world.start_store("store-routes", free_port(), fast_reads="false")
    fast_url = world.start_store("store-fast", free_port(), fast_reads="true")
    good = {user: world.token(user) for user in ("alice", "bob", "carol")}
    payload, mac = good["alice"].split(".")
    tokens: list[str | None] = [
        *good.values(), world.token("alice", "admin"), None, world.token("alice", ttl_s=-1),
        payload + "." + mac[:-2] + ("AA" if mac[-2:] != "AA" else "BB"), "not-a-token",
    ]  # fmt: skip
    _, _, first = world.raw("GET", "/ledger?limit=5", token=good["alice"], base=routes_url)
    cursor = json.loads(first)["next_cursor"]
    assert cursor, "alice has more than 5 entries: the second page needs a cursor"
    paths = [
        "/balance", "/balance?unknown=1",
        "/consumption", "/consumption?period=24h", "/consumption?period=7d",
        "/consumption?period=30d", "/consumption?period=all", "/consumption?period=%37d",
        "/consumption?period=bad", "/consumption?period=", "/consumption?period=7d&period=30d",
        "/consumption?period=7d&extra=1",
        "/ledger", "/ledger?limit=5", f"/ledger?limit=5&cursor={cursor}", "/ledger?limit=020",
        "/ledger?limit=200", "/ledger?limit=0", "/ledger?limit=201", "/ledger?limit=abc",
        "/ledger?limit=%C2%B2", "/ledger?cursor=bogus", f"/ledger?cursor={'s' + '1' * 32}",
        "/ledger?cursor=", "/ledger?limit=5&limit=6", "/ledger?cursor=%ZZ",
    ]  # fmt: skip
    compared = 0
    for token in tokens:
        for path in paths:
            away_from_the_hour()
            routes = world.raw("GET", path, token=token, base=routes_url)
            fast = world.raw("GET", path, token=token, base=fast_url)
            assert fast == routes, (path, token, fast, routes)
            compared += 1
    bad_scheme = {"Authorization": f"Basic {good['alice']}"}
    assert world.raw("GET", "/balance", headers=bad_scheme, base=fast_url) == \
        world.raw("GET", "/balance", headers=bad_scheme, base=routes_url)  # fmt: skip
    assert compared == len(tokens) * len(paths)
    # And the data is really there: the comparison is not between two empty answers.
    status, _, body = world.raw("GET", "/consumption?period=30d", token=good["alice"],
                                base=fast_url)  # fmt: skip
    assert status == 200 and json.loads(body)["total"]["calls"] == 30


def scope(path: str, query: str = "", token: str | None = None,
          method: str = "GET") -> dict[str, Any]:  # fmt: skip
    return http_scope(path, query, token, method)


def test_the_fast_path_answers_good_requests_and_hands_on_the_rest(world: StoreWorld) -> None:
    settings = world.env_settings()
    token = world.token("alice")

    async def run() -> None:
        reads = ReadModels(settings)
        await reads.start()
        downstream = Downstream()
        app = HotReads(downstream, reads, TOKEN_SECRET.encode(), "/credit-store")
        try:
            answered = [
                scope("/credit-store/balance", token=token),
                scope("/credit-store/consumption", "period=30d", token),
                scope("/credit-store/ledger", "limit=5", token),
                scope("/credit-store/ledger", "cursor=", token),
            ]
            for request in answered:
                assert await status_of(app, request) == 200, request
            assert downstream.paths == []
            handed_on = [
                scope("/credit-store/balance"),  # no token
                scope("/credit-store/balance", token=token + "x"),  # tampered
                scope("/credit-store/balance", token=world.token("alice", ttl_s=-1)),
                scope("/credit-store/balance", token=token, method="POST"),
                scope("/credit-store/consumption", "period=1y", token),
                scope("/credit-store/consumption", "period=7d&period=7d", token),
                scope("/credit-store/ledger", "limit=0", token),
                scope("/credit-store/ledger", "limit=-1", token),
                scope("/credit-store/ledger", "since=1", token),
                scope("/credit-store/products", token=token),  # not a hot read
            ]
            for request in handed_on:
                assert await status_of(app, request) == HANDED_ON, request
            assert len(downstream.paths) == len(handed_on)
        finally:
            await reads.close()

    asyncio.run(run())
