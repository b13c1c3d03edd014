"""Redis connections: one helper, with timeouts from the settings and a clear error."""

from __future__ import annotations

import redis

from kernel.errors import StackError
from kernel.settings import Settings


def connect_redis(settings: Settings) -> redis.Redis:
    client = redis.Redis.from_url(
        settings.redis_url, socket_timeout=settings.redis.socket_timeout_ms / 1000,
        socket_connect_timeout=settings.postgres.connect_timeout_s,
    )  # fmt: skip
    try:
        client.ping()
    except redis.RedisError as exc:
        raise StackError(
            f"cannot reach Redis: {exc}; start it with `creditledger stack up` or set REDIS_URL"
        ) from exc
    return client
