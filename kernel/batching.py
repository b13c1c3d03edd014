"""Concurrent lookups answered together: one query for the requests that wait at once.

Under load the credit-store and plaza APIs have dozens of reads in flight, each one a query whose
fixed cost (a round trip, the driver's bookkeeping, Postgres's executor start) is most of
its price. :class:`Batcher` lets at most ``max_running`` fetches run at once; a lookup that
arrives while they are all busy waits, and the next free fetch takes every waiting lookup
(up to ``max_batch``) in one call. So a lone request is fetched at once, alone, and a
crowd is fetched in a few large queries: batches grow only when there is a queue to
drain, and never add a wait of their own. The fetch function gets the keys in arrival
order and returns one result per key, in the same order.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

from kernel.errors import QueryError

K = TypeVar("K")
R = TypeVar("R")


class Batcher(Generic[K, R]):
    def __init__(self, fetch: Callable[[list[K]], Awaitable[Sequence[R]]], *,
                 max_batch: int, max_running: int) -> None:  # fmt: skip
        if max_batch < 1 or max_running < 1:
            raise ValueError("max_batch and max_running must be at least 1")
        self.fetch = fetch
        self.max_batch = max_batch
        self.max_running = max_running
        self._waiting: deque[tuple[K, asyncio.Future[R]]] = deque()
        self._running = 0
        self.batches = 0  # fetches made so far (for tests and curious operators)
        # The drain tasks, held so they are not garbage-collected mid-flight.
        self._tasks: set[asyncio.Task[None]] = set()

    async def get(self, key: K) -> R:
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._waiting.append((key, future))
        if self._running < self.max_running:
            self._running += 1
            task = asyncio.create_task(self._drain())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return await future

    async def _drain(self) -> None:
        try:
            while self._waiting:
                batch = [self._waiting.popleft()
                         for _ in range(min(self.max_batch, len(self._waiting)))]  # fmt: skip
                # A lookup whose caller went away (a closed connection) is not fetched.
                batch = [(key, future) for key, future in batch if not future.done()]
                if batch:
                    await self._fetch(batch)
        finally:
            self._running -= 1

    async def _fetch(self, batch: list[tuple[K, asyncio.Future[R]]]) -> None:
        self.batches += 1
        try:
            results = await self.fetch([key for key, _ in batch])
            if len(results) != len(batch):
                raise QueryError(f"a batch of {len(batch)} lookups got {len(results)} results")
        except BaseException as exc:  # every caller of the batch sees the failure as its own
            failure = exc if isinstance(exc, Exception) else QueryError("the read was cancelled")
            for _, future in batch:
                if not future.done():
                    future.set_exception(failure)
            if not isinstance(exc, Exception):
                raise  # a cancelled drain (shutdown) still ends as cancelled
            return
        for (_, future), result in zip(batch, results, strict=True):
            if not future.done():
                future.set_result(result)
