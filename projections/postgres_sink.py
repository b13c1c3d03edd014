"""The Postgres projection: ledger entries, accounts and hourly consumption.

One batch is one transaction: lock the progress rows of the batch's
partitions, drop what was applied already (see :mod:`projections.progress`),
COPY the rest into a temporary staging table, then one statement inserts the
entries and bumps the aggregates from the entries that were *actually
inserted* (``ON CONFLICT DO NOTHING ... RETURNING``), so a redelivered entry
changes nothing, aggregates included; and the new progress is written before
the commit. A crash before the commit leaves the previous state and progress;
after it, both moved together. So the tables always hold the fold of a prefix
of each partition.

The same statements serve ``replay``'s catch-up phase: a sink takes the name
of the schema it writes to.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any

import psycopg
from psycopg import sql

from contracts.commands import ENTRY_FIELDS
from kernel.db import connect
from kernel.errors import ProjectionError
from kernel.settings import Settings
from projections.entries import (
    AMOUNT,
    EVENT,
    KIND,
    OFFSET_COLUMN,
    PARTITION,
    RAW_COLUMNS,
    SEQ,
    USER,
    Row,
    printable,
    split_storable,
)
from projections.progress import BatchPlan, plan_batch

log = logging.getLogger(__name__)

PROJECTION = "postgres"
RETRIES = 5

# The raw layout of an entry: times as integer milliseconds. Shared by the
# live staging table and replay's bulk-load table.
RAW_COLUMN_TYPES = (*(f.sql_type for f in ENTRY_FIELDS), "integer", "bigint")
RAW_COLUMNS_DDL = ", ".join(f"{c} {t}" for c, t in zip(RAW_COLUMNS, RAW_COLUMN_TYPES, strict=True))

# From the raw layout to ledger_entries' columns. Milliseconds become
# timestamptz by integer interval arithmetic (no float on the way).
ENTRY_SELECT = ", ".join(
    [f"timestamptz 'epoch' + {f.name} * interval '1 millisecond'" if f.time else f.name
     for f in ENTRY_FIELDS] + ["ledger_partition", "ledger_offset"]
)  # fmt: skip
ENTRY_COLUMNS = ", ".join([f.record for f in ENTRY_FIELDS] + ["ledger_partition", "ledger_offset"])
# The UTC hour of an occurred_at, whatever the session's time zone.
HOUR_OF = "date_trunc('hour', {col} AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'"

APPLY_SQL = (
    """
WITH ins AS (
    INSERT INTO {schema}.ledger_entries ("""
    + ENTRY_COLUMNS
    + """)
    SELECT """
    + ENTRY_SELECT
    + """ FROM stage_entries
    ON CONFLICT DO NOTHING
    RETURNING user_id, seq, kind, amount_micro, balance_after_micro, recorded_at, occurred_at,
              model_alias, scene, input_tokens, output_tokens, cached_tokens, reasoning_tokens
), acc AS (
    INSERT INTO {schema}.accounts AS a
        (user_id, balance_micro, seq, granted_micro, charged_micro, updated_at)
    SELECT user_id,
           (array_agg(balance_after_micro ORDER BY seq DESC))[1],
           max(seq),
           coalesce(sum(amount_micro) FILTER (WHERE kind <> 'charge'), 0),
           coalesce(-sum(amount_micro) FILTER (WHERE kind = 'charge'), 0),
           (array_agg(recorded_at ORDER BY seq DESC))[1]
    FROM ins GROUP BY user_id
    ON CONFLICT (user_id) DO UPDATE SET
        balance_micro = CASE WHEN excluded.seq > a.seq
                             THEN excluded.balance_micro ELSE a.balance_micro END,
        updated_at = CASE WHEN excluded.seq > a.seq THEN excluded.updated_at ELSE a.updated_at END,
        seq = greatest(a.seq, excluded.seq),
        granted_micro = a.granted_micro + excluded.granted_micro,
        charged_micro = a.charged_micro + excluded.charged_micro
), cons AS (
    INSERT INTO {schema}.consumption_hourly AS c
        (user_id, hour, model_alias, scene, credits_micro, input_tokens, output_tokens,
         cached_tokens, reasoning_tokens, calls)
    SELECT user_id, """
    + HOUR_OF.format(col="occurred_at")
    + """,
           coalesce(model_alias, ''), coalesce(scene, ''), -sum(amount_micro),
           sum(input_tokens), sum(output_tokens), sum(cached_tokens), sum(reasoning_tokens),
           count(*)
    FROM ins WHERE kind = 'charge' GROUP BY 1, 2, 3, 4
    ON CONFLICT (user_id, hour, model_alias, scene) DO UPDATE SET
        credits_micro = c.credits_micro + excluded.credits_micro,
        input_tokens = c.input_tokens + excluded.input_tokens,
        output_tokens = c.output_tokens + excluded.output_tokens,
        cached_tokens = c.cached_tokens + excluded.cached_tokens,
        reasoning_tokens = c.reasoning_tokens + excluded.reasoning_tokens,
        calls = c.calls + excluded.calls
)
SELECT count(*) FROM ins
"""
)


QUARANTINE_SQL = (
    "INSERT INTO public.quarantined_entries (projection, topic, partition, ledger_offset, "
    "user_id, seq, event_id, kind, amount_micro, reason) SELECT * FROM unnest(%s::text[], "
    "%s::text[], %s::int[], %s::bigint[], %s::text[], %s::bigint[], %s::text[], %s::text[], "
    "%s::bigint[], %s::text[]) ON CONFLICT DO NOTHING"
)


def quarantine(cursor: psycopg.Cursor[Any], projection: str, topic: str,
               bad: list[tuple[Row, str]]) -> None:  # fmt: skip
    """Record entries the read models cannot store, in the caller's transaction (so they
    and the progress past them commit together). Logged loudly: ``verify`` fails on them."""
    if not bad:
        return
    for row, reason in bad:
        log.error("%s projection: ledger entry %s[%d]@%d (user %s, seq %d) quarantined: %s",
                  projection, topic, row[PARTITION], row[OFFSET_COLUMN], printable(row[USER], 60),
                  row[SEQ], reason)  # fmt: skip
    columns = list(zip(*[
        (projection, topic, row[PARTITION], row[OFFSET_COLUMN], printable(row[USER]), row[SEQ],
         printable(row[EVENT]), printable(row[KIND]), row[AMOUNT], printable(reason, 1000))
        for row, reason in bad], strict=True))  # fmt: skip
    cursor.execute(QUARANTINE_SQL, [list(c) for c in columns])


def copy_raw(cursor: psycopg.Cursor[Any], table: sql.Composable, rows: list[Row]) -> None:
    """COPY rows in the raw layout into ``table`` (binary: no text formatting per value)."""
    statement = sql.SQL("COPY {} ({}) FROM STDIN (FORMAT BINARY)").format(
        table, sql.SQL(", ").join(sql.Identifier(c) for c in RAW_COLUMNS)
    )
    with cursor.copy(statement) as copy:
        copy.set_types(list(RAW_COLUMN_TYPES))
        for row in rows:
            copy.write_row(row)


class PostgresConnection:
    """One Postgres connection, opened in ``start()``: what every Postgres sink holds."""

    def __init__(self, settings: Settings, dsn: str | None) -> None:
        self.settings = settings
        self.dsn = dsn
        self._conn: psycopg.Connection[Any] | None = None

    def start(self) -> None:
        self._conn = connect(self.settings, dsn=self.dsn)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    @property
    def conn(self) -> psycopg.Connection[Any]:
        if self._conn is None:
            raise ProjectionError(f"{type(self).__name__} used before start()")
        return self._conn


class PostgresSink(PostgresConnection):
    """Applies batches of ledger rows to the read-model tables of one schema."""

    name = PROJECTION

    def __init__(self, settings: Settings, *, dsn: str | None = None,
                 schema: str = "public") -> None:  # fmt: skip
        super().__init__(settings, dsn)
        self.schema = schema
        self._apply = sql.SQL(APPLY_SQL).format(schema=sql.Identifier(schema))

    def start(self) -> None:
        super().start()
        self.conn.execute(
            f"CREATE TEMP TABLE IF NOT EXISTS stage_entries ({RAW_COLUMNS_DDL}) "
            "ON COMMIT DELETE ROWS".encode()
        )
        self.conn.commit()

    def _progress_table(self) -> sql.Composed:
        return sql.SQL("{}.projection_progress").format(sql.Identifier(self.schema))

    def stored(self, topic: str, partitions: list[int]) -> dict[int, int]:
        try:
            rows = self.conn.execute(
                sql.SQL("SELECT partition, next_offset FROM {} WHERE projection = %s AND "
                        "topic = %s AND partition = ANY(%s)").format(self._progress_table()),
                (PROJECTION, topic, partitions),
            ).fetchall()  # fmt: skip
            self.conn.commit()
        except psycopg.Error as exc:
            self._rollback()
            raise ProjectionError(f"reading the Postgres progress failed: {exc}") from exc
        return {int(p): int(o) for p, o in rows}

    def apply(self, topic: str, rows: dict[int, list[Row]], lows: dict[int, int],
              sought: dict[int, int]) -> BatchPlan:  # fmt: skip
        isolate = False
        for attempt in range(RETRIES):
            try:
                return self._apply_once(topic, rows, lows, sought, isolate=isolate)
            except (psycopg.errors.DeadlockDetected, psycopg.errors.SerializationFailure):
                # Two projectors overlapping during a rebalance: the loser retries and
                # then finds its rows applied.
                self._rollback()
                time.sleep(0.05 * (attempt + 1))
            except (psycopg.errors.DataError, psycopg.errors.ProgramLimitExceeded) as exc:
                if isolate:
                    self._rollback()
                    raise ProjectionError(f"Postgres projection batch failed: {exc}") from exc
                # Some entry passed the field rules yet Postgres cannot store it: apply the
                # batch entry by entry, and quarantine the ones it refuses.
                log.warning("Postgres projection batch refused (%s); isolating the entry", exc)
                self._rollback()
                isolate = True
            except psycopg.Error as exc:
                self._rollback()
                raise ProjectionError(f"Postgres projection batch failed: {exc}") from exc
        raise ProjectionError(f"Postgres projection batch kept deadlocking ({RETRIES} tries)")

    def _rollback(self) -> None:
        # On a lost connection the rollback fails too; the projector reconnects.
        with contextlib.suppress(psycopg.Error):
            self.conn.rollback()

    def _apply_rows(self, cur: psycopg.Cursor[Any], topic: str, rows: list[Row],
                    isolate: bool) -> None:  # fmt: skip
        good, bad = split_storable(rows)
        if not isolate:
            copy_raw(cur, sql.Identifier("stage_entries"), good)
            cur.execute(self._apply)
        else:
            for row in good:
                cur.execute("SAVEPOINT entry")
                try:
                    copy_raw(cur, sql.Identifier("stage_entries"), [row])
                    cur.execute(self._apply)
                    cur.execute("TRUNCATE stage_entries")
                except (psycopg.errors.DataError, psycopg.errors.ProgramLimitExceeded) as exc:
                    cur.execute("ROLLBACK TO SAVEPOINT entry")
                    bad.append((row, f"Postgres refused it: {exc}".strip()))
                cur.execute("RELEASE SAVEPOINT entry")
        quarantine(cur, self.name, topic, bad)

    def _apply_once(self, topic: str, rows: dict[int, list[Row]], lows: dict[int, int],
                    sought: dict[int, int], *, isolate: bool = False) -> BatchPlan:  # fmt: skip
        conn = self.conn
        partitions = sorted(rows)
        progress = self._progress_table()
        with conn.cursor() as cur:
            # Make sure every progress row exists, then lock them (sorted: no lock-order
            # deadlock between two projectors).
            cur.execute(
                sql.SQL("INSERT INTO {} (projection, topic, partition, next_offset) "
                        "SELECT %s, %s, p, o FROM unnest(%s::int[], %s::bigint[]) AS x(p, o) "
                        "ON CONFLICT DO NOTHING").format(progress),
                (PROJECTION, topic, partitions, [lows.get(p, 0) for p in partitions]),
            )  # fmt: skip
            cur.execute(
                sql.SQL("SELECT partition, next_offset FROM {} WHERE projection = %s AND "
                        "topic = %s AND partition = ANY(%s) ORDER BY partition "
                        "FOR UPDATE").format(progress),
                (PROJECTION, topic, partitions),
            )  # fmt: skip
            stored = {int(p): int(o) for p, o in cur.fetchall()}
            plan = plan_batch(rows, stored, sought)
            if plan.apply:
                self._apply_rows(cur, topic, plan.rows, isolate)
                done = list(plan.next_offsets)
                cur.execute(
                    sql.SQL("UPDATE {} AS g SET next_offset = x.o, updated_at = now() "
                            "FROM unnest(%s::int[], %s::bigint[]) AS x(p, o) "
                            "WHERE g.projection = %s AND g.topic = %s AND g.partition = x.p"
                            ).format(progress),
                    (done, [plan.next_offsets[p] for p in done], PROJECTION, topic),
                )  # fmt: skip
        conn.commit()
        return plan
