"""A Redis that comes back empty, refilled from Postgres instead of from the ledger's start.

Redis runs without persistence: after a restart it holds no snapshot and no progress. The
Postgres read model holds, per account, the balance and seq of the newest entry it applied
(``accounts``) and, written in the same transactions, the next ledger offset per partition
(``projection_progress``). Read in one REPEATABLE READ transaction they are the fold of an
exact ledger prefix: the snapshots to write, and the offsets the Redis projector goes on
from. So an empty Redis costs one scan of ``accounts`` (replay's rebuild writes ~150,000
snapshots/s) and the entries after the Postgres progress, not a refold of all history.

Nothing here can make Redis wrong, whoever else writes to it meanwhile:

- a snapshot only replaces one of a lower or equal seq (``REBUILD_LUA``), so a newer one
  written by a running projector stays;
- the progress is set only for a partition that has none (``HSETNX``), after the
  snapshots, so a crash in between leaves the partition to be refilled again;
- snapshots of users on partitions that still have their progress are newer than that
  progress, which verify allows (a snapshot ahead of its progress must carry that entry's
  balance, and these are the Postgres fold's).

What the skipped entries would also have done: the projector drops the proxy's hold of a
charge, and marks its event folded, when it applies the charge's entry. Redis lost those
holds with everything else; a hold the proxy made after the restart for a charge already
in the refilled snapshot stays until it expires. That errs on the safe side: the user's
available balance looks lower, never higher, for that long.
"""

from __future__ import annotations

import logging
from typing import Any

import psycopg
import redis

from contracts.redis_keys import balance_key, progress_key
from kernel.db import connect
from kernel.errors import CreditLedgerError
from kernel.settings import Settings

log = logging.getLogger(__name__)

CHUNK = 2000
POSTGRES_PROJECTION = "postgres"  # projections.postgres_sink.PROJECTION


def refill_from_postgres(settings: Settings, client: redis.Redis, script: Any, prefix: str,
                         topic: str, partitions: list[int]) -> dict[int, int]:  # fmt: skip
    """Write every ``accounts`` snapshot and, for each of ``partitions`` that Postgres has a
    progress for and Redis has none, that progress. Returns the progress Redis now holds
    for those partitions. ``script``: ``REBUILD_LUA`` registered on ``client``. Postgres
    being unreachable is not an error: the projector then reads the ledger from its start,
    as it would without this."""
    try:
        with connect(settings) as conn:
            # One snapshot of the read model: the accounts are the fold up to the progress.
            conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
            conn.read_only = True
            rows = conn.execute("SELECT partition, next_offset FROM projection_progress WHERE "
                                "projection = %s AND topic = %s AND partition = ANY(%s)",
                                (POSTGRES_PROJECTION, topic, partitions)).fetchall()  # fmt: skip
            progress = {int(p): int(o) for p, o in rows}
            written = _write_snapshots(conn, client, script, prefix) if progress else 0
            conn.rollback()
    except (psycopg.Error, CreditLedgerError) as exc:
        log.warning("redis projection: cannot refill from Postgres (%s); reading the ledger "
                    "from its start instead", exc)  # fmt: skip
        return {}
    if not progress:
        return {}
    key = progress_key(prefix, topic)
    pipe = client.pipeline(transaction=False)
    for partition, offset in sorted(progress.items()):
        pipe.hsetnx(key, str(partition), offset)
    pipe.execute()
    values = client.hmget(key, [str(p) for p in sorted(progress)])
    now = {p: int(v) for p, v in zip(sorted(progress), values, strict=True) if v is not None}
    log.warning("redis projection: no progress in Redis for partitions %s; refilled %d "
                "snapshots from Postgres and going on from %s", partitions, written,
                now)  # fmt: skip
    return now


def _write_snapshots(conn: psycopg.Connection[Any], client: redis.Redis, script: Any,
                     prefix: str) -> int:  # fmt: skip
    written = 0
    with conn.cursor(name="redis_refill") as cursor:
        cursor.itersize = CHUNK
        cursor.execute("SELECT user_id, seq, balance_micro, (extract(epoch FROM updated_at) * "
                       "1000)::bigint FROM accounts")  # fmt: skip
        while chunk := cursor.fetchmany(CHUNK):
            keys = [balance_key(prefix, str(row[0])) for row in chunk]
            args: list[Any] = []
            for _user, seq, balance, updated_ms in chunk:
                args += [seq, balance, updated_ms]
            written += int(script(keys=keys, args=args))
    return written
