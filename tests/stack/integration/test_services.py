"""Postgres and Redis answer, as the application (not the superuser) sees them."""

from __future__ import annotations

import psycopg
import redis

from kernel.settings import Settings


def test_postgres_accepts_the_application_role(stack_settings: Settings) -> None:
    with psycopg.connect(stack_settings.postgres_dsn, connect_timeout=5) as conn:
        user, version = conn.execute("SELECT current_user, current_setting('server_version_num')")\
            .fetchone() or ("", "0")  # fmt: skip
        conn.execute("CREATE TEMP TABLE probe (amount_micro bigint NOT NULL)")
        conn.execute("INSERT INTO probe VALUES (9223372036854775807)")
        row = conn.execute("SELECT amount_micro FROM probe").fetchone()
    assert user == "creditledger"
    assert int(version) >= 150000
    assert row == (9223372036854775807,)


def test_postgres_listens_on_loopback_only(stack_settings: Settings) -> None:
    with psycopg.connect(stack_settings.postgres_dsn) as conn:
        row = conn.execute("SELECT current_setting('listen_addresses')").fetchone()
    assert row is not None
    assert row[0] in ("127.0.0.1", "localhost", "::1") or stack_settings.postgres.external


def test_redis_answers_and_keeps_nothing_on_disk(stack_settings: Settings) -> None:
    client = redis.Redis.from_url(stack_settings.redis_url)
    try:
        assert client.set("creditledger:probe", "1", ex=10)
        assert client.get("creditledger:probe") == b"1"
        if not stack_settings.redis.external:
            save = client.config_get("save")["save"]
            appendonly = client.config_get("appendonly")["appendonly"]
            assert save == ""
            assert appendonly == "no"
    finally:
        client.delete("creditledger:probe")
        client.close()
