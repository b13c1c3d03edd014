"""One isolated world per test or run: a Postgres database, a ledger topic, a Redis prefix,
and the environment that points every part at them.

Parts are started à la carte as real processes in the world's :class:`ProcessGroup`
(``start_projector``, ``start_relay``, or any ``creditledger`` command with
:meth:`World.start`), so a test can SIGKILL them; :class:`Writer` applies entries
through the real sinks without Kafka, for tests of what reads the read models.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
from confluent_kafka import TopicPartition
from pydantic import SecretStr

from contracts.commands import Entry
from contracts.records import LEDGER_TOPIC, entry_to_record
from contracts.redis_keys import balance_pattern, progress_key
from kernel.db import connect
from kernel.redis import connect_redis
from kernel.settings import Settings, load_settings
from projections.entries import LogPosition, Row, decode_row
from projections.migrate import migrate
from projections.postgres_sink import PROJECTION, PostgresSink
from projections.redis_sink import RedisSink
from stack.processes import ProcessGroup
from streams.codec import AvroCodec
from streams.kafka_clients import make_consumer, make_producer
from testbed.topics import ScratchTopics

CLI = (sys.executable, "-m", "creditledger.cli")

READ_MODELS = ("ledger_entries", "accounts", "consumption_hourly")
ORDER = {
    "ledger_entries": "user_id, seq",
    "accounts": "user_id",
    "consumption_hourly": "user_id, hour, model_alias, scene",
}


# Parts of a world serve no /metrics unless a test asks (many run at once on one host).
NO_METRICS_PORTS = {f"CREDITLEDGER_METRICS__{name}": "0" for name in
                    ("WORKER_PORT", "POSTGRES_PROJECTOR_PORT", "REDIS_PROJECTOR_PORT")}  # fmt: skip


def kafka_env(settings: Settings) -> dict[str, str]:
    """``settings.kafka`` as the environment of a child process (secrets revealed): every
    part of a world talks to the same brokers, in the same way, with the same topics."""
    env: dict[str, str] = {}
    for name, value in settings.kafka.model_dump().items():
        if value is None:
            continue
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        text = str(value).lower() if isinstance(value, bool) else str(value)
        env[f"CREDITLEDGER_KAFKA__{name.upper()}"] = text
    return env


def with_database(url: str, database: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{database}"))


class World:
    def __init__(self, stack_settings: Settings, scratch: ScratchTopics, unique: str,
                 codec: AvroCodec, partitions: int = 6) -> None:  # fmt: skip
        self.unique = unique
        self.codec = codec
        self.topic = scratch.create("ledger", partitions)
        self.partitions = partitions
        self.database = f"test_{unique}"
        with connect(stack_settings, autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {self.database}".encode())
        self.dsn = with_database(stack_settings.postgres_dsn, self.database)
        self.prefix = f"test-{unique}"
        self.overrides = {
            # The world lives on the given stack's Kafka (a cluster's, a secured one's).
            "kafka": stack_settings.kafka.model_dump(),
            "postgres": {"url": self.dsn},
            "projections": {
                "ledger_topic": self.topic, "redis_key_prefix": self.prefix,
                "postgres_group": f"test-pg-{unique}", "redis_group": f"test-redis-{unique}",
            },
        }  # fmt: skip
        self.settings = load_settings(**self.overrides)
        self.stack_settings = stack_settings
        migrate(self.settings)
        self.logdir = Path(f"/tmp/creditledger-test-{unique}")
        self.parts = ProcessGroup(self.logdir)
        self.extra_env: dict[str, str] = {}
        # Per part: what only that process gets (e.g. its own Kafka user on a secured stack).
        self.part_env: dict[str, dict[str, str]] = {}

    @property
    def processes(self) -> dict[str, subprocess.Popen[bytes]]:
        return self.parts.processes

    # -- Kafka -----------------------------------------------------------------------------

    def produce(self, entries: list[Entry]) -> None:
        producer = make_producer(self.settings)
        failures: list[Any] = []
        for entry in entries:
            value = self.codec.encode(LEDGER_TOPIC, entry_to_record(entry))
            producer.produce(
                self.topic, key=entry.user_id.encode(), value=value,
                on_delivery=lambda e, _m: failures.append(e) if e else None,
            )  # fmt: skip
            producer.poll(0)
        assert producer.flush(60) == 0 and not failures, failures[:3]

    def high_watermarks(self) -> dict[int, int]:
        consumer = make_consumer(self.settings, f"test-marks-{self.unique}")
        try:
            return {p: consumer.get_watermark_offsets(TopicPartition(self.topic, p), timeout=10)[1]
                    for p in range(self.partitions)}  # fmt: skip
        finally:
            consumer.close()

    # -- processes -------------------------------------------------------------------------

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update({
            "CREDITLEDGER_POSTGRES__URL": self.dsn,
            "CREDITLEDGER_PROJECTIONS__LEDGER_TOPIC": self.topic,
            "CREDITLEDGER_PROJECTIONS__REDIS_KEY_PREFIX": self.prefix,
            "CREDITLEDGER_PROJECTIONS__POSTGRES_GROUP": f"test-pg-{self.unique}",
            "CREDITLEDGER_PROJECTIONS__REDIS_GROUP": f"test-redis-{self.unique}",
            **kafka_env(self.settings),
            **NO_METRICS_PORTS,
        })  # fmt: skip
        if "DATABASE_URL" in env:
            env["DATABASE_URL"] = self.dsn
        env.update(self.extra_env)
        return env

    def command(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "creditledger.cli", *args], env=self.env(),
            capture_output=True, text=True, timeout=timeout,
        )  # fmt: skip

    def start(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        """Start ``creditledger <args>`` in this world as part ``name``."""
        return self.parts.start(
            name, [*CLI, *args], env={**self.env(), **self.part_env.get(name, {})}
        )

    def start_projector(self, sink: str, name: str | None = None) -> None:
        self.start(name or sink, "project", sink)

    def start_relay(self, name: str = "relay") -> None:
        self.start(name, "outbox", "relay", "--metrics-port", "0")

    def kill(self, name: str) -> None:
        """SIGKILL the part's whole process group; the part is gone from the world."""
        self.parts.kill(name)
        self.parts.processes.pop(name)

    def stop(self, name: str) -> None:
        self.parts.stop(name, timeout_s=20)

    def stop_all(self) -> None:
        self.parts.stop_all()

    def log_tail(self, name: str | None = None, lines: int = 15) -> str:
        """One part's last log lines, or every part's."""
        return self.parts.tail(name, lines) if name else self.parts.tails(lines)

    # -- progress --------------------------------------------------------------------------

    def postgres_progress(self) -> dict[int, int]:
        with connect(self.settings) as conn:
            rows = conn.execute(
                "SELECT partition, next_offset FROM projection_progress WHERE projection = %s "
                "AND topic = %s", (PROJECTION, self.topic)).fetchall()  # fmt: skip
        return {int(p): int(o) for p, o in rows}

    def redis_progress(self) -> dict[int, int]:
        client = connect_redis(self.settings)
        try:
            raw = client.hgetall(progress_key(self.prefix, self.topic))
        finally:
            client.close()
        return {int(p): int(o) for p, o in raw.items()}

    def wait_caught_up(self, sinks: tuple[str, ...] = ("postgres", "redis"),
                       timeout: float = 120) -> None:  # fmt: skip
        ends = {p: o for p, o in self.high_watermarks().items() if o > 0}
        deadline = time.monotonic() + timeout
        readers = {"postgres": self.postgres_progress, "redis": self.redis_progress}
        while True:
            behind = {s: {p: (readers[s]().get(p, 0), e) for p, e in ends.items()
                          if readers[s]().get(p, 0) < e} for s in sinks}  # fmt: skip
            if not any(behind.values()):
                return
            for name in self.processes:
                assert self.parts.alive(name), f"{name} died:\n{self.log_tail()}"
            if time.monotonic() > deadline:
                raise AssertionError(f"projections not caught up: {behind}\n{self.log_tail()}")
            time.sleep(0.2)

    # -- reading the read models -----------------------------------------------------------

    def accounts(self) -> dict[str, list[int]]:
        with connect(self.settings) as conn:
            rows = conn.execute(
                "SELECT user_id, balance_micro, seq, granted_micro, charged_micro, "
                "(extract(epoch FROM updated_at) * 1000)::bigint FROM accounts"
            ).fetchall()  # fmt: skip
        return {str(r[0]): [int(x) for x in r[1:]] for r in rows}

    def consumption(self) -> dict[tuple[str, int, str, str], list[int]]:
        with connect(self.settings) as conn:
            rows = conn.execute(
                "SELECT user_id, (extract(epoch FROM hour) * 1000)::bigint, model_alias, scene, "
                "credits_micro, input_tokens, output_tokens, cached_tokens, reasoning_tokens, "
                "calls FROM consumption_hourly").fetchall()  # fmt: skip
        return {(str(r[0]), int(r[1]), str(r[2]), str(r[3])): [int(x) for x in r[4:]]
                for r in rows}  # fmt: skip

    def entry_count(self) -> int:
        with connect(self.settings) as conn:
            row = conn.execute("SELECT count(*) FROM ledger_entries").fetchone()
        return int(row[0]) if row else 0

    def snapshots(self) -> dict[str, tuple[int, int, int]]:
        """user -> (balance_micro, seq, updated_at_ms) from Redis."""
        client = connect_redis(self.settings)
        head = len(f"{self.prefix}:balance:")
        try:
            out = {}
            for key in client.scan_iter(match=balance_pattern(self.prefix), count=1000):
                b, s, u = client.hmget(key, ["balance_micro", "seq", "updated_at_ms"])
                out[key.decode()[head:]] = (int(b or 0), int(s or 0), int(u or 0))
            return out
        finally:
            client.close()

    def checksums(self) -> dict[str, str]:
        """md5 of every row of each read model in key order: byte-for-byte comparison."""
        sums = {}
        with connect(self.settings) as conn:
            for table in READ_MODELS:
                row = conn.execute(
                    f"SELECT count(*), md5(coalesce(string_agg(t::text, '|' ORDER BY "
                    f"{ORDER[table]}), '')) FROM {table} AS t".encode()).fetchone()  # fmt: skip
                assert row is not None
                sums[table] = f"{row[0]} rows, md5 {row[1]}"
        return sums

    # -- clean up --------------------------------------------------------------------------

    def cleanup(self) -> None:
        self.parts.stop_all(timeout_s=10)
        self._drop_database()
        client = connect_redis(self.settings)
        try:
            keys = list(client.scan_iter(match=f"{self.prefix}:*", count=1000))
            for start in range(0, len(keys), 1000):
                client.delete(*keys[start : start + 1000])
        finally:
            client.close()

    def _drop_database(self, timeout_s: float = 60) -> None:
        """DROP ... WITH (FORCE) ends our own sessions, but the application role may not
        end an autovacuum worker that happens to be busy in the database (a superuser's
        process): that refusal is retried until the worker is done."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                with connect(self.stack_settings, autocommit=True) as conn:
                    conn.execute(f"DROP DATABASE IF EXISTS {self.database} WITH (FORCE)"
                                 .encode())  # fmt: skip
                return
            except (psycopg.errors.InsufficientPrivilege, psycopg.errors.ObjectInUse):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)


class Writer:
    """Applies ledger entries through the real sinks, as the projectors do, without Kafka (for
    tests of what reads the read models)."""

    def __init__(self, settings: Settings, topic: str, codec: AvroCodec) -> None:
        self.settings = settings
        self.topic = topic
        self.codec = codec
        self.offset = 0
        self.seq: dict[str, int] = {}
        self.balance: dict[str, int] = {}

    def rows(self, entries: list[Entry]) -> list[Row]:
        out = []
        for entry in entries:
            value = self.codec.encode(LEDGER_TOPIC, entry_to_record(entry))
            out.append(decode_row(self.codec, value,
                                  LogPosition(self.topic, 0, self.offset)))  # fmt: skip
            self.offset += 1
        return out

    def entry(self, user: str, amount: int, occurred_ms: int, model: str = "m1",
              kind: str = "charge") -> Entry:  # fmt: skip
        self.seq[user] = self.seq.get(user, 0) + 1
        signed = -amount if kind == "charge" else amount
        self.balance[user] = self.balance.get(user, 0) + signed
        charge = kind == "charge"
        return Entry(
            user_id=user, seq=self.seq[user], event_id=f"{user}-{self.seq[user]}",
            command_digest="d", kind=kind, amount_micro=signed,
            balance_after_micro=self.balance[user], occurred_at_ms=occurred_ms,
            recorded_at_ms=occurred_ms + 5, scene="chat" if charge else None,
            model_alias=model if charge else None, upstream_model="u" if charge else None,
            input_tokens=2 * amount if charge else 0, output_tokens=amount if charge else 0,
            price_rule_id="r" if charge else None, price_rule_version=1 if charge else None,
        )  # fmt: skip

    def apply(self, entries: list[Entry]) -> None:
        rows = {0: self.rows(entries)}
        for sink in (PostgresSink(self.settings), RedisSink(self.settings)):
            sink.start()
            try:
                sink.apply(self.topic, rows, {0: 0}, {})
            finally:
                sink.close()
