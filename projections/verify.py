"""``creditledger verify``: fold the ledger topic independently and compare the read models.

It works on a live system: each store is compared with the fold of exactly
the prefix of the log that store says it has applied (its stored progress).

- Postgres: one REPEATABLE READ transaction reads the progress, ``accounts``,
  ``consumption_hourly`` and per-user figures of ``ledger_entries``; the
  expectation is :class:`ReadModelFold` over the entries below that progress.
- Redis: the progress is read before the snapshots are scanned; each user's
  snapshot must be at least as new as the fold up to that progress, and
  whatever seq it holds must carry that entry's balance (a snapshot newer than
  the progress is the projector moving meanwhile, not an error).

It also fails on what the comparison alone cannot see:

- an entry the read models cannot store (a field breaks its rule): the
  projectors quarantine it and go on, and verify names it (the fold here
  skips it too, so it does not also show up as a difference per table);
- a stall: a store whose progress does not reach the end of the log (as it
  was when verify started) within ``max_lag_s``;
- with ``expect_running``, a projector consumer group with no live member.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import KafkaException

from contracts.redis_keys import balance_pattern, progress_key
from kernel.db import connect
from kernel.redis import connect_redis
from kernel.settings import Settings
from projections.entries import (
    BALANCE,
    RECORDED_MS,
    SEQ,
    USER,
    LogPosition,
    decode_row,
    printable,
    row_problem,
)
from projections.model import AccountView, ReadModelFold
from projections.postgres_sink import PROJECTION
from streams.codec import AvroCodec
from streams.kafka_clients import watermarks
from streams.reading import read_topic
from streams.topic_admin import make_admin

SCAN_CHUNK = 1000


@dataclass(frozen=True)
class Difference:
    store: str  # postgres | redis
    table: str
    user_id: str
    field: str
    expected: Any
    found: Any


@dataclass
class VerifyReport:
    entries_read: int = 0
    users: int = 0
    postgres_progress: dict[int, int] = field(default_factory=dict)
    redis_progress: dict[int, int] = field(default_factory=dict)
    differences: list[Difference] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.differences

    def sample(self, per_table: int = 10) -> list[Difference]:
        """The first few differences of each store and table (one table must not hide
        the others in a long report)."""
        shown: dict[tuple[str, str], int] = {}
        picked = []
        for difference in self.differences:
            group = (difference.store, difference.table)
            if shown.get(group, 0) < per_table:
                shown[group] = shown.get(group, 0) + 1
                picked.append(difference)
        return picked


@dataclass
class PostgresView:
    progress: dict[int, int]
    accounts: dict[str, AccountView]
    entries: dict[str, tuple[int, int, int]]  # count, sum amount, sum tokens
    consumption: dict[tuple[str, int, str, str], list[int]]


def read_postgres(settings: Settings, topic: str, dsn: str | None) -> PostgresView:
    with connect(settings, dsn=dsn) as conn:
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
        progress = {int(p): int(o) for p, o in conn.execute(
            "SELECT partition, next_offset FROM projection_progress "
            "WHERE projection = %s AND topic = %s", (PROJECTION, topic)).fetchall()}  # fmt: skip
        accounts = {
            str(u): AccountView(int(b), int(s), int(g), int(c), int(ms))
            for u, b, s, g, c, ms in conn.execute(
                "SELECT user_id, balance_micro, seq, granted_micro, charged_micro, "
                "(extract(epoch FROM updated_at) * 1000)::bigint FROM accounts")
        }  # fmt: skip
        entries = {
            str(u): (int(n), int(a), int(t)) for u, n, a, t in conn.execute(
                "SELECT user_id, count(*), sum(amount_micro)::bigint, sum(input_tokens + "
                "output_tokens + cached_tokens + reasoning_tokens)::bigint FROM ledger_entries "
                "GROUP BY user_id")
        }  # fmt: skip
        consumption = {
            (str(u), int(h), str(m), str(s)): [int(x) for x in figures]
            for u, h, m, s, *figures in conn.execute(
                "SELECT user_id, (extract(epoch FROM hour) * 1000)::bigint, model_alias, scene, "
                "credits_micro, input_tokens, output_tokens, cached_tokens, reasoning_tokens, "
                "calls FROM consumption_hourly")
        }  # fmt: skip
        conn.rollback()
    return PostgresView(progress, accounts, entries, consumption)


def read_redis(settings: Settings, topic: str,
               prefix: str) -> tuple[dict[int, int], dict[str, tuple[int, int, int]]]:  # fmt: skip
    client = connect_redis(settings)
    try:
        progress = {int(p): int(o) for p, o in client.hgetall(progress_key(prefix, topic)).items()}
        head = len(f"{prefix}:balance:")
        snapshots: dict[str, tuple[int, int, int]] = {}
        keys: list[bytes] = []
        for key in client.scan_iter(match=balance_pattern(prefix), count=SCAN_CHUNK):
            keys.append(key)
            if len(keys) >= SCAN_CHUNK:
                _read_snapshots(client, keys, head, snapshots)
                keys = []
        _read_snapshots(client, keys, head, snapshots)
        return progress, snapshots
    finally:
        client.close()


def _read_snapshots(client: Any, keys: list[bytes], head: int,
                    into: dict[str, tuple[int, int, int]]) -> None:  # fmt: skip
    pipe = client.pipeline(transaction=False)
    for key in keys:
        pipe.hmget(key, ["seq", "balance_micro", "updated_at_ms"])
    for key, (seq, balance, updated) in zip(keys, pipe.execute(), strict=True):
        if seq is not None:
            into[key.decode()[head:]] = (int(seq), int(balance or 0), int(updated or 0))


def verify(
    settings: Settings,
    codec: AvroCodec,
    *,
    dsn: str | None = None,
    topic: str | None = None,
    redis_prefix: str | None = None,
    postgres: bool = True,
    redis: bool = True,
    progress: bool = True,
    max_lag_s: float | None = None,
    expect_running: bool = False,
) -> VerifyReport:
    topic = topic or settings.projections.ledger_topic
    prefix = redis_prefix or settings.projections.redis_key_prefix
    report = VerifyReport()
    pg = read_postgres(settings, topic, dsn) if postgres else None
    redis_progress, snapshots = read_redis(settings, topic, prefix) if redis else ({}, {})
    report.postgres_progress = pg.progress if pg else {}
    report.redis_progress = redis_progress
    ends = {p: high for p, (_low, high) in watermarks(settings, topic).items()}

    pg_fold, redis_fold = ReadModelFold(), ReadModelFold()
    later: dict[tuple[str, int], tuple[int, int]] = {}  # entries past the Redis progress
    for record in read_topic(settings, topic, progress=progress):
        where = LogPosition(topic, record.partition, record.offset)
        row = decode_row(codec, record.value, where)
        report.entries_read += 1
        problem = row_problem(row)
        if problem is not None:  # quarantined by the projectors, not stored
            report.differences.append(Difference("ledger", "quarantined", printable(row[USER], 60),
                                                 str(where), "storable", problem))  # fmt: skip
            continue
        if pg is not None and record.offset < pg.progress.get(record.partition, 0):
            pg_fold.add(row)
        if record.offset < redis_progress.get(record.partition, 0):
            redis_fold.add(row)
        elif redis:
            later[(row[USER], row[SEQ])] = (row[BALANCE], row[RECORDED_MS])
    if pg is not None:
        _compare_postgres(pg_fold, pg, report)
    if redis:
        _compare_redis(redis_fold, snapshots, later, report)
    report.users = len(set(pg_fold.accounts) | set(redis_fold.accounts))
    if max_lag_s is not None:
        _check_stalls(settings, topic, dsn, prefix, ends, max_lag_s, report,
                      postgres=postgres, redis=redis)  # fmt: skip
    if expect_running:
        groups = ([settings.projections.postgres_group] if postgres else []) + (
            [settings.projections.redis_group] if redis else [])  # fmt: skip
        _check_running(settings, groups, report)
    return report


def _behind(progress: dict[int, int], ends: dict[int, int]) -> dict[int, tuple[int, int]]:
    return {p: (end, progress.get(p, 0)) for p, end in ends.items() if progress.get(p, 0) < end}


def _check_stalls(settings: Settings, topic: str, dsn: str | None, prefix: str,
                  ends: dict[int, int], max_lag_s: float, report: VerifyReport, *,
                  postgres: bool, redis: bool) -> None:  # fmt: skip
    """Each store must reach the log's end as of verify's start within ``max_lag_s``."""
    readers: dict[str, Callable[[], dict[int, int]]] = {}
    if postgres:
        readers["postgres"] = lambda: read_progress_postgres(settings, topic, dsn)
    if redis:
        readers["redis"] = lambda: read_progress_redis(settings, topic, prefix)
    deadline = time.monotonic() + max_lag_s
    for store, read in readers.items():
        behind = _behind(read(), ends)
        while behind and time.monotonic() < deadline:
            time.sleep(0.5)
            behind = _behind(read(), ends)
        for partition, (end, at) in sorted(behind.items()):
            report.differences.append(Difference(
                store, "progress", "-", f"partition {partition} (stalled {max_lag_s:g} s)",
                end, at))  # fmt: skip


def _check_running(settings: Settings, groups: list[str], report: VerifyReport) -> None:
    admin = make_admin(settings)
    timeout = settings.kafka.request_timeout_ms / 1000
    try:
        futures = admin.describe_consumer_groups(groups, request_timeout=timeout)
        for group, future in futures.items():
            members = len(future.result(timeout=timeout).members)
            if members == 0:
                report.differences.append(Difference("kafka", "consumer group", "-", group,
                                                     "a running projector", "none"))  # fmt: skip
    except KafkaException as exc:
        report.differences.append(Difference("kafka", "consumer group", "-", ",".join(groups),
                                             "described", str(exc)))  # fmt: skip


def read_progress_postgres(settings: Settings, topic: str, dsn: str | None) -> dict[int, int]:
    with connect(settings, dsn=dsn) as conn:
        rows = conn.execute(
            "SELECT partition, next_offset FROM projection_progress WHERE "
            "projection = %s AND topic = %s",
            (PROJECTION, topic),
        ).fetchall()
    return {int(p): int(o) for p, o in rows}


def read_progress_redis(settings: Settings, topic: str, prefix: str) -> dict[int, int]:
    client = connect_redis(settings)
    try:
        raw = client.hgetall(progress_key(prefix, topic))
        return {int(p): int(o) for p, o in raw.items()}
    finally:
        client.close()


def _compare_postgres(fold: ReadModelFold, pg: PostgresView, report: VerifyReport) -> None:
    diff = report.differences
    for user in sorted(set(fold.accounts) | set(pg.accounts)):
        want, got = fold.accounts.get(user), pg.accounts.get(user)
        if want is None or got is None:
            diff.append(Difference("postgres", "accounts", user, "row",
                                   "present" if want else "absent",
                                   "present" if got else "absent"))  # fmt: skip
            continue
        for name in ("balance_micro", "seq", "granted_micro", "charged_micro", "updated_at_ms"):
            if getattr(want, name) != getattr(got, name):
                diff.append(Difference("postgres", "accounts", user, name,
                                       getattr(want, name), getattr(got, name)))  # fmt: skip
    names = ("entries", "sum amount_micro", "sum tokens")
    for user in sorted(set(fold.entries) | set(pg.entries)):
        stats = fold.entries.get(user)
        want_e = (stats.count, stats.amount_micro, stats.tokens) if stats else (0, 0, 0)
        got_e = pg.entries.get(user, (0, 0, 0))
        for name, w, g in zip(names, want_e, got_e, strict=True):
            if w != g:
                diff.append(Difference("postgres", "ledger_entries", user, name, w, g))
    columns = ("credits_micro", "input_tokens", "output_tokens", "cached_tokens",
               "reasoning_tokens", "calls")  # fmt: skip
    for key in sorted(set(fold.consumption) | set(pg.consumption)):
        want_c = fold.consumption.get(key, [0] * 6)
        got_c = pg.consumption.get(key, [0] * 6)
        user, hour_ms, model, scene = key
        if key not in fold.consumption or key not in pg.consumption:
            where = f"row @ hour {hour_ms} {model}/{scene}"
            diff.append(Difference("postgres", "consumption_hourly", user, where,
                                   "present" if key in fold.consumption else "absent",
                                   "present" if key in pg.consumption else "absent"))  # fmt: skip
            continue
        for name, w, g in zip(columns, want_c, got_c, strict=True):
            if w != g:
                where = f"{name} @ hour {hour_ms} {model}/{scene}"
                diff.append(Difference("postgres", "consumption_hourly", user, where, w, g))


def _compare_redis(fold: ReadModelFold, snapshots: dict[str, tuple[int, int, int]],
                   later: dict[tuple[str, int], tuple[int, int]],
                   report: VerifyReport) -> None:  # fmt: skip
    diff = report.differences
    for user in sorted(set(fold.accounts) | set(snapshots)):
        want = fold.accounts.get(user)
        got = snapshots.get(user)
        if got is None:
            diff.append(Difference("redis", "balance", user, "snapshot", "present", "absent"))
            continue
        seq, balance, updated = got
        if want is not None and seq < want.seq:
            diff.append(Difference("redis", "balance", user, "seq (stale)", want.seq, seq))
            continue
        if want is not None and seq == want.seq:
            expected = (want.balance_micro, want.updated_at_ms)
        elif (user, seq) in later:
            expected = later[(user, seq)]
        else:
            diff.append(Difference("redis", "balance", user, "seq", "an entry of the log", seq))
            continue
        if balance != expected[0]:
            diff.append(Difference("redis", "balance", user, "balance_micro", expected[0], balance))
        if updated != expected[1]:
            diff.append(Difference("redis", "balance", user, "updated_at_ms", expected[1], updated))
