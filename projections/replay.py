"""``creditledger replay``: rebuild the read models from offset 0 of the ledger topic.

Phases, recorded in ``replay_shadow.replay_state`` so an interrupted replay
resumes where it stopped (``--restart`` throws the shadow away instead):

1. **load**: COPY every entry up to the end offsets taken at the start into an
   unindexed table ``replay_shadow.raw_entries``; each batch commits with its
   progress (both tables are UNLOGGED: a Postgres crash empties both together,
   and the load starts over, consistently).
2. **build** (one transaction): ``ledger_entries`` sorted by (user, seq), then
   the primary key, unique and other indexes copied from the live tables'
   definitions (the migrations stay the only schema source), then
   ``accounts`` and ``consumption_hourly`` by GROUP BY over the entries.
3. **catch up**: entries that arrived meanwhile, through the live projector's
   own statements (:class:`PostgresSink` on the shadow schema).
4. **swap** (one transaction): block the live projector's writes (readers go
   on), catch the shadow up to exactly the live progress, move the live tables
   out and the shadow tables in, carry the progress over. Readers see the old
   tables or the new ones, never a half-built state; the live projector
   continues from the same offsets.
5. **Redis**: rewrite every snapshot from the new ``accounts`` (a snapshot is
   replaced unless Redis already holds a newer seq).
"""

from __future__ import annotations

import json
import multiprocessing
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql
from tqdm import tqdm

from contracts.redis_keys import balance_key
from kernel.db import connect
from kernel.errors import ProjectionError
from kernel.redis import connect_redis
from kernel.settings import Settings, project_path
from projections.entries import Row, split_storable
from projections.postgres_sink import (
    ENTRY_COLUMNS,
    ENTRY_SELECT,
    HOUR_OF,
    PROJECTION,
    RAW_COLUMNS_DDL,
    PostgresConnection,
    PostgresSink,
    copy_raw,
    quarantine,
)
from projections.progress import BatchPlan, plan_batch
from projections.projector import Projector
from projections.redis_sink import REBUILD_LUA
from streams.codec import AvroCodec
from streams.kafka_clients import watermarks

SHADOW = "replay_shadow"
OLD = "replay_old"
READ_MODELS = ("ledger_entries", "accounts", "consumption_hourly")
REPLAY_LOCK = 0x7265_706C_6179  # "replay"
REDIS_CHUNK = 2000

ACCOUNTS_BUILD = """
INSERT INTO {s}.accounts (user_id, balance_micro, seq, granted_micro, charged_micro, updated_at)
SELECT l.user_id, l.balance_after_micro, l.seq, t.granted, t.charged, l.recorded_at
FROM (SELECT DISTINCT ON (user_id) user_id, seq, balance_after_micro, recorded_at
      FROM {s}.ledger_entries ORDER BY user_id, seq DESC) AS l
JOIN (SELECT user_id,
             coalesce(sum(amount_micro) FILTER (WHERE kind <> 'charge'), 0) AS granted,
             coalesce(-sum(amount_micro) FILTER (WHERE kind = 'charge'), 0) AS charged
      FROM {s}.ledger_entries GROUP BY user_id) AS t USING (user_id)
"""
CONSUMPTION_BUILD = (
    """
INSERT INTO {s}.consumption_hourly (user_id, hour, model_alias, scene, credits_micro,
    input_tokens, output_tokens, cached_tokens, reasoning_tokens, calls)
SELECT user_id, """
    + HOUR_OF.format(col="occurred_at")
    + """,
       coalesce(model_alias, ''), coalesce(scene, ''), -sum(amount_micro), sum(input_tokens),
       sum(output_tokens), sum(cached_tokens), sum(reasoning_tokens), count(*)
FROM {s}.ledger_entries WHERE kind = 'charge' GROUP BY 1, 2, 3, 4
"""
)


@dataclass
class ReplayReport:
    topic: str
    loaded: int = 0
    caught_up: int = 0
    entries: int = 0
    accounts: int = 0
    redis_snapshots: int = 0
    resumed: bool = False
    load_seconds: float = 0.0
    build_seconds: float = 0.0
    swap_seconds: float = 0.0
    redis_seconds: float = 0.0
    interrupted: bool = False


class RawLoadSink(PostgresConnection):
    """Bulk-load sink: COPY into ``replay_shadow.raw_entries`` plus its progress."""

    name = "replay-load"

    def stored(self, topic: str, partitions: list[int]) -> dict[int, int]:
        rows = self.conn.execute(
            f"SELECT partition, next_offset FROM {SHADOW}.load_progress".encode()
        ).fetchall()
        self.conn.commit()
        return {int(p): int(o) for p, o in rows if p in partitions}

    def apply(self, topic: str, rows: dict[int, list[Row]], lows: dict[int, int],
              sought: dict[int, int]) -> BatchPlan:  # fmt: skip
        stored = self.stored(topic, sorted(rows))
        plan = plan_batch(rows, {p: stored.get(p, lows.get(p, 0)) for p in rows}, sought)
        if plan.apply:
            with self.conn.cursor() as cur:
                good, bad = split_storable(plan.rows)
                copy_raw(cur, sql.SQL(f"{SHADOW}.raw_entries"), good)
                quarantine(cur, PROJECTION, topic, bad)  # as the live projector does
                done = list(plan.next_offsets)
                cur.execute(
                    f"INSERT INTO {SHADOW}.load_progress (partition, next_offset) "
                    "SELECT * FROM unnest(%s::int[], %s::bigint[]) ON CONFLICT (partition) "
                    "DO UPDATE SET next_offset = excluded.next_offset".encode(),
                    (done, [plan.next_offsets[p] for p in done]),
                )
            self.conn.commit()
        return plan


def split_partitions(left: dict[int, int], workers: int) -> list[list[int]]:
    """Partitions into ``workers`` groups of about equal remaining entries (greedy)."""
    groups: list[list[int]] = [[] for _ in range(workers)]
    sizes = [0] * workers
    for partition, count in sorted(left.items(), key=lambda item: -item[1]):
        smallest = sizes.index(min(sizes))
        groups[smallest].append(partition)
        sizes[smallest] += count
    return [sorted(group) for group in groups if group]


def _load_worker(settings: Settings, dsn: str | None, topic: str, partitions: list[int],
                 ends: dict[int, int], avro_dir: str, loaded: Any, stop: Any,
                 errors: Any) -> None:  # fmt: skip
    """One bulk-load process of ``replay`` (a spawn target: module level, picklable args)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when to stop
    from pathlib import Path

    from streams.codec import load_codec

    projector = Projector(
        settings, RawLoadSink(settings, dsn), load_codec(Path(avro_dir)),
        group_id=f"{settings.kafka.client_id}-replay", topic=topic,
        batch_max=settings.projections.replay_batch,
    )  # fmt: skip

    def advance(n: int) -> None:
        with loaded.get_lock():
            loaded.value += n

    try:
        projector.start(partitions=partitions)
        try:
            projector.run_until(ends, stop.is_set, advance)
        finally:
            projector.close()
    except Exception as exc:
        errors.put(f"{type(exc).__name__}: {exc}")
        sys.exit(1)


class Replay:
    def __init__(self, settings: Settings, codec: AvroCodec, *, dsn: str | None = None,
                 topic: str | None = None, redis_prefix: str | None = None,
                 progress: bool = True,
                 should_stop: Callable[[], bool] = lambda: False) -> None:  # fmt: skip
        self.settings = settings
        self.codec = codec
        self.dsn = dsn
        self.topic = topic or settings.projections.ledger_topic
        self.redis_prefix = redis_prefix or settings.projections.redis_key_prefix
        self.progress = progress
        self.should_stop = should_stop
        self.report = ReplayReport(self.topic)

    def _bar(self, total: int, initial: int, desc: str) -> tqdm:
        return tqdm(total=total, initial=initial, unit="entry", unit_scale=True, desc=desc,
                    file=sys.stderr, disable=not self.progress, mininterval=0.5,
                    smoothing=0.1)  # fmt: skip

    def run(self, *, restart: bool = False, redis: bool = True) -> ReplayReport:
        with connect(self.settings, dsn=self.dsn, autocommit=True) as conn:
            locked = conn.execute("SELECT pg_try_advisory_lock(%s)", (REPLAY_LOCK,)).fetchone()
            if not locked or not locked[0]:
                raise ProjectionError("another replay is running on this database")
            self._require_migrated(conn)
            if restart:
                conn.execute(f"DROP SCHEMA IF EXISTS {SHADOW} CASCADE".encode())
            phase, targets = self._state(conn)
            if phase == "loading":
                self._load(conn, targets)
                if self.report.interrupted:
                    return self.report
                self._build(conn)
            if self.should_stop():
                self.report.interrupted = True
                return self.report
            self._catch_up()
            self._swap(conn)
        if redis:
            self.rebuild_redis()
        return self.report

    # -- phases ----------------------------------------------------------------------------

    def _require_migrated(self, conn: psycopg.Connection[Any]) -> None:
        row = conn.execute("SELECT to_regclass('public.ledger_entries')").fetchone()
        if row is None or row[0] is None:
            raise ProjectionError("the read-model tables do not exist; run `creditledger migrate`")

    def _state(self, conn: psycopg.Connection[Any]) -> tuple[str, dict[int, int]]:
        row = conn.execute("SELECT to_regclass(%s)", (f"{SHADOW}.replay_state",)).fetchone()
        if row is not None and row[0] is not None:
            state = conn.execute(
                f"SELECT topic, targets, phase FROM {SHADOW}.replay_state".encode()
            ).fetchone()
            if state is None:
                raise ProjectionError(f"{SHADOW}.replay_state is empty; pass --restart")
            topic, targets, phase = state
            if topic != self.topic:
                raise ProjectionError(
                    f"an unfinished replay of {topic} exists; finish it or pass --restart"
                )
            self.report.resumed = True
            return str(phase), {int(p): int(o) for p, o in dict(targets).items()}
        marks = watermarks(self.settings, self.topic)
        targets = {p: high for p, (_low, high) in marks.items()}
        with conn.transaction():
            conn.execute(f"CREATE SCHEMA {SHADOW}".encode())
            conn.execute(
                f"CREATE TABLE {SHADOW}.replay_state (topic text NOT NULL, targets jsonb NOT "
                "NULL, phase text NOT NULL, started_at timestamptz NOT NULL DEFAULT now())"
                .encode()
            )  # fmt: skip
            conn.execute(
                f"INSERT INTO {SHADOW}.replay_state (topic, targets, phase) "
                "VALUES (%s, %s, 'loading')".encode(),
                (self.topic, json.dumps(targets)),
            )
            conn.execute(f"CREATE UNLOGGED TABLE {SHADOW}.raw_entries ({RAW_COLUMNS_DDL})".encode())
            conn.execute(
                f"CREATE UNLOGGED TABLE {SHADOW}.load_progress "
                "(partition integer PRIMARY KEY, next_offset bigint NOT NULL)".encode()
            )
        return "loading", targets

    def _load(self, conn: psycopg.Connection[Any], targets: dict[int, int]) -> None:
        started = time.monotonic()
        lows = {p: low for p, (low, _high) in watermarks(self.settings, self.topic).items()}
        sink = RawLoadSink(self.settings, self.dsn)
        sink.start()
        try:
            done = sink.stored(self.topic, sorted(targets))
        finally:
            sink.close()
        position = {p: done.get(p, lows.get(p, 0)) for p in targets}
        left = {p: t - position[p] for p, t in targets.items() if t > position[p]}
        total = sum(max(0, t - lows.get(p, 0)) for p, t in targets.items())
        with self._bar(total, total - sum(left.values()), "replay: load") as bar:
            workers = min(self.settings.projections.replay_workers, len(left))
            if workers <= 1:
                self._load_here(sorted(left), targets, bar)
            else:
                self._load_in_processes(split_partitions(left, workers), targets, bar)
        self.report.load_seconds = time.monotonic() - started
        if self.should_stop():
            self.report.interrupted = True

    def _load_here(self, partitions: list[int], targets: dict[int, int], bar: tqdm) -> None:
        if not partitions:
            return
        projector = Projector(
            self.settings, RawLoadSink(self.settings, self.dsn), self.codec,
            group_id=f"{self.settings.kafka.client_id}-replay", topic=self.topic,
            batch_max=self.settings.projections.replay_batch,
        )  # fmt: skip
        projector.start(partitions=partitions)
        try:

            def advance(n: int) -> None:
                self.report.loaded += n
                bar.update(n)

            projector.run_until({p: targets[p] for p in partitions}, self.should_stop, advance)
        finally:
            projector.close()

    def _load_in_processes(self, groups: list[list[int]], targets: dict[int, int],
                           bar: tqdm) -> None:  # fmt: skip
        """Decoding is the bottleneck of the load: one process per group of partitions.

        Each process commits its own batches with their progress, exactly as in
        one process; Ctrl-C reaches them through ``stop`` (they ignore SIGINT).
        """
        ctx = multiprocessing.get_context("spawn")  # never fork librdkafka's threads
        loaded = ctx.Value("q", 0)
        stop = ctx.Event()
        errors = ctx.Queue()
        avro_dir = project_path(self.settings.schemas.avro_dir)
        processes = [
            ctx.Process(target=_load_worker, name=f"replay-load-{n}", args=(
                self.settings, self.dsn, self.topic, group, {p: targets[p] for p in group},
                str(avro_dir), loaded, stop, errors))
            for n, group in enumerate(groups)
        ]  # fmt: skip
        for process in processes:
            process.start()
        shown = 0
        try:
            while any(process.is_alive() for process in processes):
                if self.should_stop():
                    stop.set()
                time.sleep(0.2)
                with loaded.get_lock():
                    now = int(loaded.value)
                bar.update(now - shown)
                shown = now
        finally:
            stop.set()
            for process in processes:
                process.join()
        self.report.loaded += int(loaded.value)
        bar.update(int(loaded.value) - shown)
        failed = [p for p in processes if p.exitcode != 0]
        if failed:
            detail = errors.get(timeout=1) if not errors.empty() else "no detail"
            raise ProjectionError(f"a replay load process failed ({failed[0].name}, exit "
                                  f"{failed[0].exitcode}): {detail}")  # fmt: skip

    def _build(self, conn: psycopg.Connection[Any]) -> None:
        started = time.monotonic()
        s = sql.Identifier(SHADOW)
        with conn.transaction():
            conn.execute("SET LOCAL maintenance_work_mem = '512MB'")
            conn.execute("SET LOCAL work_mem = '256MB'")
            for table in (*READ_MODELS, "projection_progress"):
                conn.execute(
                    sql.SQL(
                        "CREATE TABLE {}.{} (LIKE public.{} INCLUDING DEFAULTS "
                        "INCLUDING CONSTRAINTS INCLUDING GENERATED)"
                    ).format(s, sql.Identifier(table), sql.Identifier(table))
                )
            conn.execute(
                sql.SQL(
                    "INSERT INTO {s}.ledger_entries ("
                    + ENTRY_COLUMNS
                    + ") SELECT "
                    + ENTRY_SELECT
                    + " FROM {s}.raw_entries ORDER BY user_id, seq"
                ).format(s=s)
            )
            for table in (*READ_MODELS, "projection_progress"):
                self._copy_indexes(conn, table)
            conn.execute(sql.SQL(ACCOUNTS_BUILD).format(s=s))
            conn.execute(sql.SQL(CONSUMPTION_BUILD).format(s=s))
            conn.execute(
                sql.SQL("INSERT INTO {s}.projection_progress (projection, topic, partition, "
                        "next_offset) SELECT %s, %s, partition, next_offset "
                        "FROM {s}.load_progress").format(s=s),
                (PROJECTION, self.topic),
            )  # fmt: skip
            conn.execute(sql.SQL("DROP TABLE {s}.raw_entries, {s}.load_progress").format(s=s))
            conn.execute(sql.SQL("UPDATE {s}.replay_state SET phase = 'built'").format(s=s))
        self.report.build_seconds = time.monotonic() - started

    def _copy_indexes(self, conn: psycopg.Connection[Any], table: str) -> None:
        """Give the shadow table the live table's keys and indexes (names included)."""
        live = f"public.{table}"
        constraints = conn.execute(
            "SELECT conname, pg_get_constraintdef(oid), conindid FROM pg_constraint "
            "WHERE conrelid = %s::regclass AND contype IN ('p', 'u', 'x') ORDER BY conname",
            (live,),
        ).fetchall()
        for name, definition, _index in constraints:
            conn.execute(
                sql.SQL("ALTER TABLE {}.{} ADD CONSTRAINT {} " + definition).format(
                    sql.Identifier(SHADOW), sql.Identifier(table), sql.Identifier(name)
                )
            )
        backing = [int(index) for _n, _d, index in constraints]
        indexes = conn.execute(
            "SELECT pg_get_indexdef(indexrelid) FROM pg_index WHERE indrelid = %s::regclass "
            "AND NOT (indexrelid = ANY(%s)) ORDER BY indexrelid",
            (live, backing),
        ).fetchall()
        for (definition,) in indexes:
            shadow_definition = str(definition).replace(f" ON {live} ", f" ON {SHADOW}.{table} ")
            conn.execute(shadow_definition.encode())

    def _sink_projector(self) -> Projector:
        sink = PostgresSink(self.settings, dsn=self.dsn, schema=SHADOW)
        return Projector(
            self.settings, sink, self.codec, group_id=f"{self.settings.kafka.client_id}-replay",
            topic=self.topic, batch_max=self.settings.projections.replay_batch,
        )  # fmt: skip

    def _catch_up(self) -> None:
        """Apply what arrived since the load's end offsets (bounded: two rounds)."""
        marks = watermarks(self.settings, self.topic)
        projector = self._sink_projector()
        projector.start(partitions=sorted(marks))
        try:
            for _round in range(2):
                ends = {p: high for p, (_low, high) in marks.items()}
                before = projector.stats.applied
                projector.run_until(ends, self.should_stop)
                self.report.caught_up += projector.stats.applied - before
                marks = watermarks(self.settings, self.topic)
        finally:
            projector.close()

    def _swap(self, conn: psycopg.Connection[Any]) -> None:
        started = time.monotonic()
        projector = self._sink_projector()
        marks = watermarks(self.settings, self.topic)
        projector.start(partitions=sorted(marks))
        try:
            with conn.transaction():
                conn.execute("SET LOCAL lock_timeout = '60s'")
                # EXCLUSIVE blocks the live projector's writes but not readers.
                conn.execute(
                    "LOCK TABLE public.projection_progress, public.ledger_entries, "
                    "public.accounts, public.consumption_hourly IN EXCLUSIVE MODE"
                )
                live = {
                    int(p): int(o) for p, o in conn.execute(
                        "SELECT partition, next_offset FROM public.projection_progress "
                        "WHERE projection = %s AND topic = %s", (PROJECTION, self.topic),
                    ).fetchall()
                }  # fmt: skip
                before = projector.stats.applied
                projector.run_until(live)
                self.report.caught_up += projector.stats.applied - before
                conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(OLD)))
                for table in READ_MODELS:
                    t = sql.Identifier(table)
                    conn.execute(sql.SQL("ALTER TABLE public.{} SET SCHEMA {}").format(
                        t, sql.Identifier(OLD)))  # fmt: skip
                    conn.execute(sql.SQL("ALTER TABLE {}.{} SET SCHEMA public").format(
                        sql.Identifier(SHADOW), t))  # fmt: skip
                conn.execute(
                    "DELETE FROM public.projection_progress WHERE projection = %s AND topic = %s",
                    (PROJECTION, self.topic),
                )
                conn.execute(
                    sql.SQL("INSERT INTO public.projection_progress (projection, topic, "
                            "partition, next_offset) SELECT projection, topic, partition, "
                            "next_offset FROM {}.projection_progress").format(
                        sql.Identifier(SHADOW)),
                )  # fmt: skip
                conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(OLD)))
                conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(SHADOW)))
                counts = conn.execute(
                    "SELECT (SELECT count(*) FROM public.ledger_entries), "
                    "(SELECT count(*) FROM public.accounts)"
                ).fetchone()
                if counts is not None:
                    self.report.entries, self.report.accounts = int(counts[0]), int(counts[1])
        finally:
            projector.close()
        self.report.swap_seconds = time.monotonic() - started

    # -- Redis -----------------------------------------------------------------------------

    def rebuild_redis(self) -> int:
        """Rewrite every Redis snapshot from ``accounts`` (newer seq in Redis wins)."""
        started = time.monotonic()
        client = connect_redis(self.settings)
        script = client.register_script(REBUILD_LUA)
        written = 0
        try:
            with connect(self.settings, dsn=self.dsn) as conn:
                total_row = conn.execute("SELECT count(*) FROM accounts").fetchone()
                total = int(total_row[0]) if total_row else 0
                with (
                    self._bar(total, 0, "replay: redis") as bar,
                    conn.cursor(name="replay_redis") as cur,
                ):
                    cur.itersize = REDIS_CHUNK
                    cur.execute(
                        "SELECT user_id, seq, balance_micro, "
                        "(extract(epoch FROM updated_at) * 1000)::bigint FROM accounts"
                    )
                    while chunk := cur.fetchmany(REDIS_CHUNK):
                        keys = [balance_key(self.redis_prefix, str(row[0])) for row in chunk]
                        args: list[Any] = []
                        for _user, seq, balance, updated_ms in chunk:
                            args += [seq, balance, updated_ms]
                        written += int(script(keys=keys, args=args))
                        bar.update(len(chunk))
        finally:
            client.close()
        self.report.redis_snapshots = written
        self.report.redis_seconds = time.monotonic() - started
        return written
