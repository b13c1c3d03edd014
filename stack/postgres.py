"""A throw-away Postgres cluster made with ``initdb`` in the stack's state directory.

Postgres refuses to run as root, so when the launcher is root the cluster
belongs to an unprivileged OS user (``stack.postgres_os_user``, created if
missing). The superuser is reached through a Unix socket in the cluster's own
folder (trust, local only); applications use the role and database named in
``postgres.url``, which the launcher creates with that URL's password.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import stat
import subprocess
from pathlib import Path
from urllib.parse import unquote, urlsplit

from kernel.errors import StackError
from kernel.settings import Settings
from stack.processes import ServiceDir, refuse_taken_port

INSTALL_HINT = "apt-get install postgresql (the launcher needs initdb and postgres)"


def find_binary(name: str) -> str:
    """Find a Postgres server binary: on PATH, else the newest /usr/lib/postgresql/*/bin."""
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(
        glob.glob(f"/usr/lib/postgresql/*/bin/{name}"),
        key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0,
    )
    if not candidates:
        raise StackError(f"Postgres binary {name!r} not found: {INSTALL_HINT}")
    return candidates[-1]


class PostgresService:
    name = "postgres"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.dir = ServiceDir(self.name, settings.stack.state_dir / self.name)
        url = urlsplit(settings.postgres_dsn)
        self.host = url.hostname or "127.0.0.1"
        self.port = url.port or 5432
        self.app_user = unquote(url.username or "creditledger")
        self.app_password = unquote(url.password or "")
        self.app_database = (url.path or "/creditledger").lstrip("/") or self.app_user

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}/{self.app_database}"

    @property
    def data_dir(self) -> Path:
        return self.dir.root / "data"

    @property
    def socket_dir(self) -> Path:
        return self.dir.root / "sock"

    def _os_user(self) -> str | None:
        """The user to run Postgres as: None when we are not root."""
        if os.geteuid() != 0:
            return None
        name = self.settings.stack.postgres_os_user
        try:
            pwd.getpwnam(name)
        except KeyError:
            result = subprocess.run(
                ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
                capture_output=True, text=True, check=False,
            )  # fmt: skip
            if result.returncode != 0:
                raise StackError(f"cannot create OS user {name!r}: {result.stderr}") from None
        return name

    def _chown(self, path: Path, user: str | None) -> None:
        if user is not None:
            entry = pwd.getpwnam(user)
            os.chown(path, entry.pw_uid, entry.pw_gid)

    def start(self) -> int | None:
        if self.dir.running_pid() is not None:
            return None
        refuse_taken_port(self.host, self.port, "DATABASE_URL")
        user = self._os_user()
        root = self.dir.root
        root.mkdir(parents=True, exist_ok=True)
        self._chown(root, user)
        # Postgres must be able to reach its folder through every parent.
        for parent in root.parents:
            if parent == Path("/"):
                break
            if user is not None and not parent.stat().st_mode & stat.S_IXOTH:
                raise StackError(f"{parent} is not traversable by {user}; choose another state_dir")
        if not (self.data_dir / "PG_VERSION").exists():
            self._initdb(user)
        self.socket_dir.mkdir(exist_ok=True)
        self._chown(self.socket_dir, user)
        self.dir.log_file.touch()
        self._chown(self.dir.log_file, user)
        argv = [
            find_binary("postgres"), "-D", str(self.data_dir),
            "-p", str(self.port),
            "-c", f"listen_addresses={self.host}",
            "-c", f"unix_socket_directories={self.socket_dir}",
            "-c", "max_connections=200",
            "-c", "shared_buffers=256MB",
        ]  # fmt: skip
        return self.dir.spawn(argv, user=user)

    def _initdb(self, user: str | None) -> None:
        shutil.rmtree(self.data_dir, ignore_errors=True)
        command = [
            find_binary("initdb"), "-D", str(self.data_dir), "-U", "postgres",
            "--auth-local=trust", "--auth-host=scram-sha-256",
            "--encoding=UTF8", "--locale=C",
        ]  # fmt: skip
        result = subprocess.run(
            command, capture_output=True, text=True, check=False, user=user, cwd=self.dir.root
        )
        if result.returncode != 0:
            raise StackError(f"initdb failed (exit {result.returncode}):\n{result.stderr}")

    def _superuser_conninfo(self) -> str:
        return f"host={self.socket_dir} port={self.port} user=postgres dbname=postgres"

    def ready(self) -> bool:
        """Answering? Ours is asked as superuser (the app role may not exist yet);
        an external one as the application, through ``postgres.url``."""
        import psycopg

        conninfo = (
            self.settings.postgres_dsn
            if self.settings.postgres.external
            else self._superuser_conninfo()
        )
        try:
            with psycopg.connect(conninfo, connect_timeout=2) as conn:
                conn.execute("SELECT 1")
        except psycopg.OperationalError:
            return False
        return True

    def bootstrap(self) -> None:
        """Create the application role and database from ``postgres.url``, if missing.

        The role may create databases: on this throw-away local stack, tests and
        benchmarks each make a database of their own.
        """
        import psycopg
        from psycopg import sql

        with psycopg.connect(self._superuser_conninfo(), autocommit=True) as conn:
            role = conn.execute(
                "SELECT 1 FROM pg_roles WHERE rolname = %s", (self.app_user,)
            ).fetchone()
            statement = (
                "ALTER ROLE {} WITH LOGIN CREATEDB PASSWORD {}"
                if role
                else "CREATE ROLE {} WITH LOGIN CREATEDB PASSWORD {}"
            )
            conn.execute(
                sql.SQL(statement).format(
                    sql.Identifier(self.app_user), sql.Literal(self.app_password)
                )
            )
            exists = conn.execute(
                "SELECT 1 FROM pg_database WHERE datname = %s", (self.app_database,)
            ).fetchone()
            if not exists:
                conn.execute(
                    sql.SQL("CREATE DATABASE {} OWNER {}").format(
                        sql.Identifier(self.app_database), sql.Identifier(self.app_user)
                    )
                )
