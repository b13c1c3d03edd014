"""Reader queries on real Postgres and Redis: periods at their boundaries, pagination, balance."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest

from contracts.records import to_ms
from kernel.errors import QueryError
from kernel.settings import Settings, load_settings, project_path
from projections.queries import ReadModels
from streams.codec import load_codec
from testbed.topics import ScratchTopics
from testbed.world import World, Writer

NOW = datetime(2026, 3, 10, 12, 30, tzinfo=UTC)


def at(text: str) -> int:
    return to_ms(datetime.fromisoformat(text).replace(tzinfo=UTC))


@pytest.fixture
def world(stack_settings: Settings, scratch: ScratchTopics, unique: str) -> Iterator[World]:
    codec = load_codec(project_path(stack_settings.schemas.avro_dir))
    env = World(stack_settings, scratch, unique, codec, partitions=1)
    yield env
    env.cleanup()


def test_consumption_periods_at_their_boundaries(world: World) -> None:
    w = Writer(world.settings, world.topic, world.codec)
    user = "period-user"
    w.apply([
        w.entry(user, 50_000_000, at("2026-01-01T00:00:00"), kind="purchase"),  # not consumption
        w.entry(user, 1_000_000, at("2026-02-08T23:59:59.999")),  # all only
        w.entry(user, 100_000, at("2026-02-09T00:00:00.000")),  # first instant of 30d
        w.entry(user, 10_000, at("2026-03-03T23:59:59.999")),  # last instant before 7d
        w.entry(user, 1_000, at("2026-03-04T00:00:00.000"), model="m2"),  # first instant of 7d
        w.entry(user, 100, at("2026-03-09T12:59:59.999"), model="m2"),  # just before 24h
        w.entry(user, 10, at("2026-03-09T13:00:00.000")),  # first instant of 24h
        w.entry(user, 1, at("2026-03-10T12:59:59.999")),  # last instant of the current hour
        w.entry(user, 10_000_000, at("2026-03-10T13:00:00.000")),  # next hour: in no period
    ])  # fmt: skip

    async def run() -> None:
        models = ReadModels(world.settings)
        await models.start()
        try:
            expected = {"24h": 11, "7d": 1_111, "30d": 111_111, "all": 1_111_111}
            for period, credits in expected.items():
                c = await models.consumption(user, period, now=NOW)
                assert c.total.credits_micro == credits, period
                assert c.total.input_tokens == 2 * credits, period
                assert c.total.output_tokens == credits, period
                assert sum(p.total.calls for p in c.series) == c.total.calls, period
            day = await models.consumption(user, "24h", now=NOW)
            assert len(day.series) == 24 and day.window.bucket == "hour"
            assert day.series[0].start == datetime(2026, 3, 9, 13, tzinfo=UTC)
            assert day.series[0].total.credits_micro == 10
            assert day.series[-1].start == datetime(2026, 3, 10, 12, tzinfo=UTC)
            assert day.series[-1].total.credits_micro == 1
            week = await models.consumption(user, "7d", now=NOW)
            assert [p.start.day for p in week.series] == [4, 5, 6, 7, 8, 9, 10]
            assert [p.total.credits_micro for p in week.series] == [1_000, 0, 0, 0, 0, 110, 1]
            assert week.by_model["m2"].credits_micro == 1_100
            assert week.by_model["m1"].credits_micro == 11
            assert week.series[5].by_model["m2"].credits_micro == 100
            month = await models.consumption(user, "30d", now=NOW)
            assert len(month.series) == 30 and month.series[0].start == datetime(
                2026, 2, 9, tzinfo=UTC
            )
            everything = await models.consumption(user, "all", now=NOW)
            assert everything.series[0].start == datetime(2026, 2, 8, tzinfo=UTC)
            nobody = await models.consumption("nobody", "30d", now=NOW)
            assert nobody.total.calls == 0 and len(nobody.series) == 30

            with pytest.raises(QueryError, match="period must be one of"):
                await models.consumption(user, "1y", now=NOW)
            with pytest.raises(QueryError, match="user_id"):
                await models.consumption("  ", "7d", now=NOW)
        finally:
            await models.close()

    asyncio.run(run())


def test_history_pages_return_every_entry_exactly_once(world: World) -> None:
    w = Writer(world.settings, world.topic, world.codec)
    user = "pager"
    w.apply([w.entry(user, 1_000 + n, at("2026-03-01T00:00:00") + n) for n in range(57)])
    w.apply([w.entry("someone-else", 5, at("2026-03-01T00:00:00"))])

    async def run() -> None:
        models = ReadModels(world.settings)
        await models.start()
        try:
            seen: list[int] = []
            cursor: str | None = None
            pages = 0
            while True:
                page = await models.history(user, cursor=cursor, limit=10)
                seen += [e.seq for e in page.entries]
                pages += 1
                if pages == 2:  # new entries while someone is paging: not in older pages
                    w.apply([w.entry(user, 7, at("2026-03-02T00:00:00") + n) for n in range(5)])
                if page.next_cursor is None:
                    break
                cursor = page.next_cursor
            assert seen == list(range(57, 0, -1)) and pages == 6
            newest = await models.history(user, limit=3)
            assert [e.seq for e in newest.entries] == [62, 61, 60]
            assert newest.entries[0].amount_micro == -7
            whole = await models.history(user, limit=200)
            assert len(whole.entries) == 62 and whole.next_cursor is None

            for bad in (0, 201, -1):
                with pytest.raises(QueryError, match="limit"):
                    await models.history(user, limit=bad)
            for cursor_text in ("garbage", "s-1", "12", "s"):
                with pytest.raises(QueryError, match="cursor"):
                    await models.history(user, cursor=cursor_text)
        finally:
            await models.close()

    asyncio.run(run())


def test_balance_from_redis_and_from_postgres_when_redis_is_down(world: World) -> None:
    w = Writer(world.settings, world.topic, world.codec)
    w.apply([w.entry("payer", 5_000_000, at("2026-03-01T00:00:00"), kind="purchase"),
             w.entry("payer", 1_234, at("2026-03-01T01:00:00"))])  # fmt: skip

    async def run(settings: Settings, source: str) -> None:
        models = ReadModels(settings)
        await models.start()
        try:
            b = await models.balance("payer")
            assert (b.balance_micro, b.seq, b.source) == (4_998_766, 2, source)
            assert b.updated_at_ms == at("2026-03-01T01:00:00") + 5
            empty = await models.balance("never-seen")
            assert (empty.balance_micro, empty.seq) == (0, 0)
        finally:
            await models.close()

    asyncio.run(run(world.settings, "redis"))
    redis_down = load_settings(**{**world.overrides, "redis": {"url": "redis://127.0.0.1:1/0"}})
    asyncio.run(run(redis_down, "postgres"))


def test_reads_batched_together_equal_each_read_alone(world: World) -> None:
    """Concurrent reads share queries (``kernel.batching``); each user still gets
    exactly their own figures and pages, as when read alone, duplicates and empty users
    included."""
    w = Writer(world.settings, world.topic, world.codec)
    users = [f"batch-user-{k}" for k in range(10)]
    written: dict[str, list[int]] = {u: [] for u in users}
    entries = []
    for k, user in enumerate(users):
        if k in (3, 7):
            continue  # no entries at all
        for n in range(k + 2):
            amount = (k + 1) * 1_000 + n
            written[user].append(amount)
            hours_ago = 3 * n + k
            entries.append(w.entry(user, amount, at("2026-03-10T12:00:00") - hours_ago * 3_600_000,
                                   model="m2" if n % 3 == 0 else "m1"))  # fmt: skip
    w.apply(entries)
    asked = [*users, users[4], users[4], "never-seen"]

    async def run() -> None:
        together = ReadModels(world.settings, batch_max=4, batch_queries=1)
        alone = ReadModels(world.settings, batch_max=1, batch_queries=1)
        await together.start()
        await alone.start()
        try:
            for period in ("24h", "7d", "30d", "all"):
                batched = await together.consumptions(asked, period, NOW)
                for user, got in zip(asked, batched, strict=True):
                    assert got == await alone.consumption(user, period, now=NOW), (user, period)
                    if period == "30d":  # every entry is within 30 days of NOW
                        assert got.total.credits_micro == sum(written.get(user, [])), user
                        assert got.total.calls == len(written.get(user, [])), user

            async def page(models: ReadModels, user: str, limit: int) -> list[list[int]]:
                pages, cursor = [], None
                while True:
                    got = await models.history(user, cursor=cursor, limit=limit)
                    pages.append([e.amount_micro for e in got.entries])
                    if got.next_cursor is None:
                        return pages
                    cursor = got.next_cursor

            for limit in (1, 3, 200):
                crowd = await asyncio.gather(*(page(together, u, limit) for u in asked))
                for user, pages in zip(asked, crowd, strict=True):
                    assert pages == await page(alone, user, limit), (user, limit)
                    flat = [-a for p in pages for a in p]
                    assert flat == list(reversed(written.get(user, []))), (user, limit)
            # The crowd really was batched: fewer queries than requests.
            assert together._history.batches < alone._history.batches
        finally:
            await together.close()
            await alone.close()

    asyncio.run(run())
