"""Queries for readers (the credit-store API, analysts): balance, consumption, history.

Async, over a small connection pool opened in :meth:`ReadModels.start`, since
the credit-store API (step 5) is an asyncio server. Every argument is checked
before any SQL runs and a bad one raises :class:`QueryError` with the reason.

- :meth:`ReadModels.balance`: the snapshot from Redis (what the proxy's guard
  reads), or from Postgres ``accounts`` when Redis cannot be reached;
- :meth:`ReadModels.consumption`: totals, a series by hour or day, and a split
  by model, for ``24h | 7d | 30d | all`` (see :mod:`projections.periods`);
- :meth:`ReadModels.history`: a user's entries newest first, with a keyset
  cursor ("view more"): every entry is returned exactly once, even while new
  entries arrive, because pages are cut by ``seq``, never by position.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any, Literal, NamedTuple

import redis.asyncio as aioredis
from psycopg_pool import AsyncConnectionPool

from contracts.redis_keys import balance_key
from kernel.batching import Batcher
from kernel.db import open_pool
from kernel.errors import QueryError
from kernel.settings import Settings
from projections.periods import PERIODS, Window, window

MAX_USER_ID = 256
MAX_LIMIT = 200
CURSOR = re.compile(r"^s(\d{1,18})$")


# Plain dataclasses, on purpose: a frozen one's __init__ sets each field through
# object.__setattr__ (5x the cost), and orjson serialises a slots one 6x slower than one
# with a __dict__; the API builds ~150 of these per consumption reply. Nothing holds on to
# them: they are built, serialised and dropped.
@dataclass
class Balance:
    user_id: str
    balance_micro: int
    seq: int  # 0: no entry yet
    updated_at_ms: int | None
    source: Literal["redis", "postgres"]


@dataclass
class Usage:
    credits_micro: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0
    reasoning_tokens: int = 0
    calls: int = 0

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            self.credits_micro + other.credits_micro, self.input_tokens + other.input_tokens,
            self.output_tokens + other.output_tokens, self.cached_tokens + other.cached_tokens,
            self.reasoning_tokens + other.reasoning_tokens, self.calls + other.calls,
        )  # fmt: skip


# The total of every empty bucket: shared, as these results are serialised and dropped,
# never changed.
ZERO = Usage()


@dataclass
class SeriesPoint:
    start: datetime
    total: Usage
    by_model: dict[str, Usage] = field(default_factory=dict)


@dataclass
class Consumption:
    user_id: str
    window: Window
    total: Usage
    by_model: dict[str, Usage]
    series: list[SeriesPoint]


@dataclass
class HistoryEntry:
    seq: int
    event_id: str
    kind: str
    amount_micro: int
    balance_after_micro: int
    reference: str | None
    scene: str | None
    model_alias: str | None
    input_tokens: int
    output_tokens: int
    cached_tokens: int
    reasoning_tokens: int
    usage_estimated: bool
    occurred_at: datetime
    recorded_at: datetime


@dataclass
class HistoryPage:
    user_id: str
    entries: list[HistoryEntry]
    next_cursor: str | None  # None: nothing older


def check_user(user_id: str) -> str:
    if not isinstance(user_id, str) or not user_id.strip():
        raise QueryError("user_id must be a non-empty string")
    user_id = user_id.strip()
    if len(user_id) > MAX_USER_ID:
        raise QueryError(f"user_id is longer than {MAX_USER_ID} characters")
    return user_id


def check_limit(limit: int) -> int:
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_LIMIT:
        raise QueryError(f"limit must be an integer from 1 to {MAX_LIMIT}; got {limit!r}")
    return limit


def parse_cursor(cursor: str | None) -> int | None:
    """The seq below which the next page starts (``None``: the newest page)."""
    if cursor is None or cursor == "":
        return None
    match = CURSOR.match(cursor) if isinstance(cursor, str) else None
    if match is None:
        raise QueryError(f"cursor {cursor!r} is not one this API returned")
    return int(match.group(1))


def make_cursor(seq: int) -> str:
    return f"s{seq}"


# Each query answers a batch of users (see :mod:`kernel.batching`): ``n`` is a
# user's place in the batch, 1-based, and the rows come ordered by it.
#
# Postgres adds up the series, the per-model and the overall totals (grouping sets) so the
# API does no arithmetic per row: ``grouping`` says which sum a row is (0: one model in one
# bucket, 1: a bucket's total, 2: a model's total, 3: the whole window). A user with no
# usage in the window has no rows at all.
CONSUMPTION_SQL = """
WITH hours AS (
    SELECT asked.n,
           date_trunc(%(bucket)s, c.hour AT TIME ZONE 'UTC') AT TIME ZONE 'UTC' AS start,
           c.model_alias, c.credits_micro, c.input_tokens, c.output_tokens, c.cached_tokens,
           c.reasoning_tokens, c.calls
    FROM unnest(%(users)s::text[]) WITH ORDINALITY AS asked(user_id, n)
    JOIN consumption_hourly c ON c.user_id = asked.user_id
    WHERE c.hour >= %(start)s AND c.hour < %(end)s
)
SELECT n, grouping(start, model_alias), start, model_alias,
       sum(credits_micro)::bigint, sum(input_tokens)::bigint, sum(output_tokens)::bigint,
       sum(cached_tokens)::bigint, sum(reasoning_tokens)::bigint, sum(calls)::bigint
FROM hours
GROUP BY GROUPING SETS ((n, start, model_alias), (n, start), (n, model_alias), (n))
ORDER BY 1, 2, 3, 4
"""

# The columns in HistoryEntry's field order, so a row (after ``n``) builds one directly.
HISTORY_SQL = """
SELECT asked.n, e.seq, e.event_id, e.kind, e.amount_micro, e.balance_after_micro,
       e.reference, e.scene, e.model_alias, e.input_tokens, e.output_tokens, e.cached_tokens,
       e.reasoning_tokens, e.usage_estimated, e.occurred_at, e.recorded_at
FROM unnest(%(users)s::text[], %(befores)s::bigint[], %(limits)s::integer[])
     WITH ORDINALITY AS asked(user_id, before_seq, max_rows, n)
CROSS JOIN LATERAL (
    SELECT * FROM ledger_entries l
    WHERE l.user_id = asked.user_id AND l.seq < asked.before_seq
    ORDER BY l.seq DESC
    LIMIT asked.max_rows
) e
ORDER BY asked.n, e.seq DESC
"""

EPOCH_START = datetime(1970, 1, 1, tzinfo=UTC)
_MS = timedelta(milliseconds=1)
NO_CURSOR = 2**62


class ReadModels:
    """The read side: a Postgres pool and a Redis client, opened in :meth:`start`."""

    def __init__(self, settings: Settings, *, dsn: str | None = None,
                 redis_prefix: str | None = None, pool_size: int = 10, batch_max: int = 16,
                 batch_queries: int = 4) -> None:  # fmt: skip
        """``batch_queries`` consumption (per period) or history queries run at once, each
        for up to ``batch_max`` users; more requests wait for the next batch."""
        self.settings = settings
        self.dsn = dsn or settings.postgres_dsn
        self.prefix = redis_prefix or settings.projections.redis_key_prefix
        self.pool_size = pool_size
        self._pool: AsyncConnectionPool[Any] | None = None
        self._redis: aioredis.Redis | None = None
        limits = {"max_batch": batch_max, "max_running": batch_queries}
        # Not "all": it reads every row a user has, so a query's fixed cost is a small part
        # of it, and a batch would run on one Postgres core what separate queries spread
        # over all of them (bench.projections: p99 10 ms alone, 15-34 ms batched).
        self._consumption = {
            period: Batcher[str, Consumption](partial(self._consumption_now, period), **limits)
            for period in PERIODS if period != "all"
        }  # fmt: skip
        self._history = Batcher[HistoryAsk, HistoryPage](self._histories, **limits)

    async def start(self) -> None:
        self._pool = await open_pool(self.settings, dsn=self.dsn, size=self.pool_size)
        self._redis = aioredis.Redis.from_url(
            self.settings.redis_url, socket_timeout=self.settings.redis.socket_timeout_ms / 1000,
            socket_connect_timeout=self.settings.redis.socket_timeout_ms / 1000,
        )  # fmt: skip

    async def readiness(self) -> dict[str, str]:
        """Whether each store the read models live in answers now ("ok" or why not)."""
        checks: dict[str, str] = {}
        try:
            async with self.pool.connection(timeout=1.0) as conn:
                await conn.execute("SELECT 1")
            checks["postgres"] = "ok"
        except Exception as exc:  # any failure means not ready; the reason is reported
            checks["postgres"] = f"failed: {type(exc).__name__}"
        try:
            assert self._redis is not None
            await asyncio.wait_for(self._redis.ping(), 1.0)
            checks["redis"] = "ok"
        except Exception as exc:
            checks["redis"] = f"failed: {type(exc).__name__}"
        return checks

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None
        if self._redis is not None:
            await self._redis.aclose()
            self._redis = None

    @property
    def pool(self) -> AsyncConnectionPool[Any]:
        if self._pool is None:
            raise QueryError("ReadModels used before start()")
        return self._pool

    # -- balance ---------------------------------------------------------------------------

    async def balance(self, user_id: str) -> Balance:
        """Redis snapshot first (the proxy's view); Postgres when Redis is unreachable."""
        user_id = check_user(user_id)
        try:
            return await self.redis_balance(user_id)
        except (aioredis.RedisError, OSError):
            return await self.postgres_balance(user_id)

    async def redis_balance(self, user_id: str) -> Balance:
        if self._redis is None:
            raise QueryError("ReadModels used before start()")
        values = await self._redis.hmget(
            balance_key(self.prefix, user_id), ["balance_micro", "seq", "updated_at_ms"]
        )
        if values[1] is None:
            return Balance(user_id, 0, 0, None, "redis")
        balance, seq, updated = (int(v or 0) for v in values)
        return Balance(user_id, balance, seq, updated, "redis")

    async def postgres_balance(self, user_id: str) -> Balance:
        async with self.pool.connection() as conn:
            row = await (await conn.execute(
                "SELECT balance_micro, seq, updated_at FROM accounts WHERE user_id = %s",
                (user_id,),
            )).fetchone()  # fmt: skip
        if row is None:
            return Balance(user_id, 0, 0, None, "postgres")
        updated_ms = (row[2] - EPOCH_START) // _MS
        return Balance(user_id, int(row[0]), int(row[1]), updated_ms, "postgres")

    # -- consumption -----------------------------------------------------------------------

    async def consumption(self, user_id: str, period: str, *,
                          now: datetime | None = None) -> Consumption:  # fmt: skip
        """``now`` (default: when the batch is read) places the window."""
        user_id = check_user(user_id)
        if now is not None or period not in self._consumption:  # "all", or a QueryError
            return (await self.consumptions([user_id], period, now or datetime.now(UTC)))[0]
        return await self._consumption[period].get(user_id)

    async def _consumption_now(self, period: str, users: list[str]) -> list[Consumption]:
        return await self.consumptions(users, period, datetime.now(UTC))

    async def consumptions(self, users: list[str], period: str,
                           now: datetime) -> list[Consumption]:  # fmt: skip
        """The consumption of each of ``users`` (checked by the caller), in one query."""
        win = window(period, now)
        params = {"bucket": win.bucket, "users": users, "start": win.start or EPOCH_START,
                  "end": win.end}  # fmt: skip
        async with self.pool.connection() as conn:
            # Binary results: integers and times are copied, not parsed from text.
            rows = await (await conn.execute(CONSUMPTION_SQL, params, binary=True)).fetchall()
        buckets = win.buckets()
        return [Consumption(user, win, *_fold_sums(own, buckets))
                for user, own in zip(users, _split(rows, len(users)), strict=True)]  # fmt: skip

    # -- history ---------------------------------------------------------------------------

    async def history(self, user_id: str, *, cursor: str | None = None,
                      limit: int = 20) -> HistoryPage:  # fmt: skip
        user_id = check_user(user_id)
        limit = check_limit(limit)
        before = parse_cursor(cursor)
        return await self._history.get(
            HistoryAsk(user_id, NO_CURSOR if before is None else before, limit)
        )

    async def _histories(self, asks: list[HistoryAsk]) -> list[HistoryPage]:
        # One row more than the page: whether there is anything older.
        params = {"users": [a.user_id for a in asks], "befores": [a.before for a in asks],
                  "limits": [a.limit + 1 for a in asks]}  # fmt: skip
        async with self.pool.connection() as conn:
            rows = await (await conn.execute(HISTORY_SQL, params, binary=True)).fetchall()
        pages = []
        for ask, own in zip(asks, _split(rows, len(asks)), strict=True):
            entries = [HistoryEntry(*row[1:]) for row in own[: ask.limit]]
            more = len(own) > ask.limit
            pages.append(HistoryPage(ask.user_id, entries,
                                     make_cursor(entries[-1].seq) if more else None))  # fmt: skip
        return pages


class HistoryAsk(NamedTuple):
    user_id: str
    before: int  # entries with a lower seq
    limit: int


def _split(rows: list[tuple[Any, ...]], count: int) -> list[list[tuple[Any, ...]]]:
    """A batch's rows (ordered by ``n``, the 1-based place in the batch) per place."""
    own: list[list[tuple[Any, ...]]] = [[] for _ in range(count)]
    for row in rows:
        own[row[0] - 1].append(row)
    return own


def _fold_sums(rows: list[tuple[Any, ...]], buckets: list[datetime]) -> (
        tuple[Usage, dict[str, Usage], list[SeriesPoint]]):  # fmt: skip
    """One user's CONSUMPTION_SQL rows (ordered by grouping, start, model) -> total, by model,
    series.

    No dict keyed by time: hashing an aware datetime asks its tzinfo for the offset each
    time, which was a tenth of the API's CPU per consumption reply. The rows come sorted,
    so the series is built in order and merged with the window's zero-filled buckets."""
    total = ZERO
    by_model: dict[str, Usage] = {}
    points: list[SeriesPoint] = []  # the buckets with data, in time order
    point: SeriesPoint | None = None
    totals_seen = 0
    for row in rows:
        grouping = row[1]  # row[0]: the user's place in the batch
        if grouping == 0:
            if point is None or point.start != row[2]:
                point = SeriesPoint(row[2], ZERO, {})  # its total: a grouping-1 row
                points.append(point)
            point.by_model[row[3]] = Usage(*row[4:])
        elif grouping == 1:  # one per bucket with data, in the grouping-0 rows' time order
            points[totals_seen].total = Usage(*row[4:])
            totals_seen += 1
        elif grouping == 2:
            by_model[row[3]] = Usage(*row[4:])
        else:
            total = Usage(*row[4:])
    return total, dict(sorted(by_model.items())), _zero_filled(points, buckets)


def _zero_filled(points: list[SeriesPoint], buckets: list[datetime]) -> list[SeriesPoint]:
    series: list[SeriesPoint] = []
    taken = 0
    for start in buckets:
        while taken < len(points) and points[taken].start < start:
            series.append(points[taken])
            taken += 1
        if taken < len(points) and points[taken].start == start:
            series.append(points[taken])
            taken += 1
        else:
            series.append(SeriesPoint(start, ZERO, {}))
    series.extend(points[taken:])
    return series
