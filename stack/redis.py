"""A Redis server without persistence (its data is a projection, rebuilt by replay)."""

from __future__ import annotations

import shutil
from urllib.parse import urlsplit

from kernel.errors import StackError
from kernel.settings import Settings
from stack.processes import ServiceDir, refuse_taken_port


class RedisService:
    name = "redis"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.dir = ServiceDir(self.name, settings.stack.state_dir / self.name)
        url = urlsplit(settings.redis_url)
        self.host = url.hostname or "127.0.0.1"
        self.port = url.port or 6379

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self) -> int | None:
        if self.dir.running_pid() is not None:
            return None
        refuse_taken_port(self.host, self.port, "REDIS_URL")
        binary = shutil.which("redis-server")
        if binary is None:
            raise StackError("redis-server not found: apt-get install redis-server")
        argv = [
            binary,
            "--bind", self.host, "--port", str(self.port),
            "--save", "", "--appendonly", "no",
            "--dir", str(self.dir.root),
            "--daemonize", "no",
            # Keep our command line readable in /proc: ownership checks rely on it.
            "--set-proc-title", "no",
        ]  # fmt: skip
        return self.dir.spawn(argv)

    def ready(self) -> bool:
        import redis

        client = redis.Redis.from_url(self.settings.redis_url, socket_timeout=1)
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False
        finally:
            client.close()
