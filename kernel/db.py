"""Postgres connections for the projections: UTC sessions, clear errors.

Connections are opened by the code that needs them (never at import time).
Every session runs in UTC so that hour and day buckets never depend on the
server's or the client's time zone.
"""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool

from kernel.errors import StackError
from kernel.settings import Settings

SESSION_OPTIONS = "-c TimeZone=UTC -c statement_timeout=0"
# The pools serve requests: short queries, many at once. A parallel plan starts worker
# processes for each query (~5 ms here) and takes cores the other requests need; the
# planner picks one when it cannot see a LIMIT's value (a batched page's ``LIMIT a.lim``).
SERVING_OPTIONS = f"{SESSION_OPTIONS} -c max_parallel_workers_per_gather=0"


def connect(settings: Settings, *, dsn: str | None = None, autocommit: bool = False) -> (
        psycopg.Connection[Any]):  # fmt: skip
    target = dsn or settings.postgres_dsn
    try:
        return psycopg.connect(
            target, autocommit=autocommit, connect_timeout=settings.postgres.connect_timeout_s,
            options=SESSION_OPTIONS, application_name="creditledger",
        )  # fmt: skip
    except psycopg.OperationalError as exc:
        raise StackError(
            f"cannot reach Postgres: {exc}".strip()
            + "; start it with `creditledger stack up` or set DATABASE_URL"
        ) from exc


async def open_pool(settings: Settings, *, dsn: str | None = None,
                    size: int = 10) -> AsyncConnectionPool[Any]:  # fmt: skip
    """An open autocommit pool of UTC sessions that serve requests (no parallel plans), or
    a :class:`StackError` saying how to start Postgres. The pool starts with one connection
    and grows to ``size`` under load."""
    timeout = settings.postgres.connect_timeout_s
    pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
        dsn or settings.postgres_dsn, min_size=1, max_size=size, open=False,
        kwargs={"options": SERVING_OPTIONS, "autocommit": True, "connect_timeout": timeout,
                "application_name": "creditledger"},
    )  # fmt: skip
    try:
        await pool.open(wait=True, timeout=timeout)
    except Exception as exc:
        await pool.close()
        raise StackError(f"cannot reach Postgres: {exc}; start it with `creditledger "
                         "stack up` or set DATABASE_URL") from exc  # fmt: skip
    return pool
