"""Postgres connections for the projections: UTC sessions, clear errors.

Connections are opened by the code that needs them (never at import time).
Every session runs in UTC so that hour and day buckets never depend on the
server's or the client's time zone.
"""

from __future__ import annotations

from typing import Any

import psycopg

from creditledger.errors import StackError
from creditledger.settings import Settings

SESSION_OPTIONS = "-c TimeZone=UTC -c statement_timeout=0"


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
