"""Versioned SQL migrations: plain ``NNNN_name.sql`` files applied in order.

Each file runs in its own transaction together with its row in
``schema_migrations``, so a failed migration leaves nothing behind. A session
advisory lock serialises concurrent ``migrate`` runs (every process may call
it at start). A migration that was applied and whose file changed since is an
error: history is not rewritten, a new file is added instead.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import psycopg

from kernel.db import connect
from kernel.errors import ProjectionError
from kernel.settings import Settings

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
FILE_PATTERN = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
# Any fixed number: it only has to be the same for every migrate run.
ADVISORY_LOCK = 0x6372_6564_6974  # "credit"


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def load_migrations(directory: Path = MIGRATIONS_DIR) -> list[Migration]:
    migrations: list[Migration] = []
    for path in sorted(directory.glob("*.sql")):
        match = FILE_PATTERN.match(path.name)
        if match is None:
            raise ProjectionError(f"{path}: migration files are named NNNN_lower_case.sql")
        migrations.append(Migration(int(match.group(1)), match.group(2), path.read_text()))
    versions = [m.version for m in migrations]
    if versions != list(range(1, len(versions) + 1)):
        raise ProjectionError(
            f"{directory}: versions must be 1, 2, 3, ... without gaps: {versions}"
        )
    return migrations


@dataclass(frozen=True)
class MigrationReport:
    applied: list[Migration]
    already: int


def migrate(settings: Settings, *, dsn: str | None = None,
            directory: Path = MIGRATIONS_DIR) -> MigrationReport:  # fmt: skip
    migrations = load_migrations(directory)
    with connect(settings, dsn=dsn, autocommit=True) as conn:
        conn.execute("SELECT pg_advisory_lock(%s)", (ADVISORY_LOCK,))
        try:
            conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations (version integer PRIMARY KEY, "
                "name text NOT NULL, checksum text NOT NULL, "
                "applied_at timestamptz NOT NULL DEFAULT now())"
            )
            rows = conn.execute("SELECT version, name, checksum FROM schema_migrations").fetchall()
            done = {int(v): (str(n), str(c)) for v, n, c in rows}
            for migration in migrations:
                if migration.version in done and done[migration.version][1] != migration.checksum:
                    raise ProjectionError(
                        f"migration {migration.version:04d}_{migration.name} was applied and its "
                        "file has changed since; add a new migration instead of editing it"
                    )
            unknown = sorted(set(done) - {m.version for m in migrations})
            if unknown:
                raise ProjectionError(
                    f"the database has migrations this code does not know: {unknown} "
                    "(is this an older checkout?)"
                )
            applied: list[Migration] = []
            for migration in migrations:
                if migration.version in done:
                    continue
                try:
                    with conn.transaction():
                        conn.execute(migration.sql.encode())
                        conn.execute(
                            "INSERT INTO schema_migrations (version, name, checksum) "
                            "VALUES (%s, %s, %s)",
                            (migration.version, migration.name, migration.checksum),
                        )
                except psycopg.Error as exc:
                    raise ProjectionError(
                        f"migration {migration.version:04d}_{migration.name} failed, nothing of "
                        f"it was applied: {exc}"
                    ) from exc
                applied.append(migration)
            return MigrationReport(applied, len(done))
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (ADVISORY_LOCK,))
