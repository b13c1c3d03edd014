"""The batcher's scheduling: a lone lookup goes alone, a crowd goes in batches, in order,
and a failure or a departed caller touches only its own batch."""

from __future__ import annotations

import asyncio

import pytest

from kernel.batching import Batcher
from kernel.errors import QueryError


class Source:
    """A fetch that records its batches and answers when the test releases it."""

    def __init__(self, fail_on: int | None = None) -> None:
        self.batches: list[list[int]] = []
        self.release = asyncio.Event()
        self.fail_on = fail_on

    async def fetch(self, keys: list[int]) -> list[str]:
        self.batches.append(keys)
        await self.release.wait()
        if self.fail_on in keys:
            raise QueryError(f"cannot read {self.fail_on}")
        return [f"value of {k}" for k in keys]


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def test_a_lone_lookup_is_fetched_alone() -> None:
    async def run() -> None:
        source = Source()
        source.release.set()
        batcher = Batcher(source.fetch, max_batch=8, max_running=2)
        assert await batcher.get(1) == "value of 1"
        assert await batcher.get(2) == "value of 2"
        assert source.batches == [[1], [2]] and batcher.batches == 2

    asyncio.run(run())


def test_lookups_that_wait_together_are_fetched_together_in_order() -> None:
    async def run() -> None:
        source = Source()
        batcher = Batcher(source.fetch, max_batch=4, max_running=2)
        tasks = [asyncio.create_task(batcher.get(k)) for k in range(11)]
        await settle()
        # Two fetches run at once, each taking at most 4 of what waited when it started.
        assert source.batches == [[0, 1, 2, 3], [4, 5, 6, 7]]
        source.release.set()
        results = await asyncio.gather(*tasks)
        assert results == [f"value of {k}" for k in range(11)]
        assert source.batches == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10]]

    asyncio.run(run())


def test_the_same_key_twice_gets_its_result_twice() -> None:
    async def run() -> None:
        source = Source()
        source.release.set()
        batcher = Batcher(source.fetch, max_batch=8, max_running=1)
        results = await asyncio.gather(*(batcher.get(k) for k in (7, 7, 3, 7)))
        assert results == ["value of 7", "value of 7", "value of 3", "value of 7"]

    asyncio.run(run())


def test_a_failed_fetch_fails_its_own_batch_only() -> None:
    async def run() -> None:
        source = Source(fail_on=5)
        batcher = Batcher(source.fetch, max_batch=3, max_running=1)
        tasks = [asyncio.create_task(batcher.get(k)) for k in range(8)]
        await settle()
        source.release.set()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        # The batch holding 5 fails for each of its keys, and only that batch.
        assert source.batches == [[0, 1, 2], [3, 4, 5], [6, 7]]
        for k in (3, 4, 5):
            assert isinstance(results[k], QueryError) and "cannot read 5" in str(results[k])
        assert [results[k] for k in (0, 1, 2, 6, 7)] == [f"value of {k}" for k in (0, 1, 2, 6, 7)]

    asyncio.run(run())


def test_a_caller_that_went_away_is_not_fetched_and_the_rest_are_answered() -> None:
    async def run() -> None:
        source = Source()
        batcher = Batcher(source.fetch, max_batch=8, max_running=1)
        first = asyncio.create_task(batcher.get(0))
        await settle()
        gone = asyncio.create_task(batcher.get(1))
        stays = asyncio.create_task(batcher.get(2))
        await settle()
        gone.cancel()
        source.release.set()
        assert await first == "value of 0" and await stays == "value of 2"
        assert source.batches == [[0], [2]]
        with pytest.raises(asyncio.CancelledError):
            await gone

    asyncio.run(run())


def test_a_fetch_with_the_wrong_number_of_results_is_an_error() -> None:
    async def short(keys: list[int]) -> list[str]:
        return ["one"]

    async def run() -> None:
        batcher = Batcher(short, max_batch=8, max_running=1)
        assert await batcher.get(0) == "one"
        crowd = [asyncio.create_task(batcher.get(k)) for k in (1, 2)]
        for task in crowd:
            with pytest.raises(QueryError, match="a batch of 2 lookups got 1 results"):
                await task

    asyncio.run(run())


def test_limits_below_one_are_refused() -> None:
    async def fetch(keys: list[int]) -> list[int]:
        return keys

    with pytest.raises(ValueError, match="at least 1"):
        Batcher(fetch, max_batch=0, max_running=1)
    with pytest.raises(ValueError, match="at least 1"):
        Batcher(fetch, max_batch=1, max_running=0)
