"""Projection benchmarks on real Kafka, Postgres and Redis.

    .venv/bin/python -m bench.projections [--entries 1000000] [--query-entries 10000000]
                                          [--parts replay,live,freshness,e2e,queries] [--quick]

Prints one table:
- replay: ``Replay`` of a ledger topic holding ``--entries`` entries into a
  fresh database (load, build, catch-up, swap; then the Redis rebuild);
- live: the Postgres projector (the incremental path) over the same topic;
- freshness: an entry produced at a steady 1,000/s -> its snapshot visible in
  Redis (the Redis projector as a real process), p50/p99;
- e2e: the same from a *charge command* through a ledger worker (step 2);
- queries: consumption 30d / all, history pages and balance, p50/p99, with
  ``--query-entries`` entries over 100k users generated in Postgres (kept in
  the database ``bench_queries`` between runs; ``--rebuild-queries`` remakes it).

Every part uses its own topic, database, Redis prefix and consumer group and
removes them afterwards (except ``bench_queries``). Needs the stack up.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import signal
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from confluent_kafka import TopicPartition
from tqdm import tqdm

from bench.ledger import percentile
from bench.ledger_load import commands, start_group_at_end
from contracts.records import LEDGER_TOPIC, command_to_record, command_topic
from contracts.redis_keys import balance_key
from creditledger.tables import render_table
from kernel.db import connect
from kernel.redis import connect_redis
from kernel.settings import Settings, load_settings, project_path
from projections.migrate import migrate
from projections.postgres_sink import PostgresSink
from projections.projector import Projector
from projections.queries import ReadModels
from projections.replay import ACCOUNTS_BUILD, CONSUMPTION_BUILD, Replay
from stack.processes import ProcessGroup
from streams import topic_admin
from streams.codec import AvroCodec, load_codec
from streams.kafka_clients import make_consumer, make_producer
from streams.topics import TopicSpec, TopicsSpec
from testbed.ledger import WorkerGroup
from testbed.world import with_database

T0_MS = 1_767_225_600_000
HOUR_MS = 3_600_000
MODELS = ("small", "large", "vision")


@dataclass
class World:
    """A bench topic, database and Redis prefix of their own."""

    settings: Settings
    topic: str
    database: str
    prefix: str
    base: Settings

    @classmethod
    def make(cls, base: Settings, label: str, partitions: int = 6,
             topic: str | None = None) -> World:  # fmt: skip
        unique = uuid.uuid4().hex[:8]
        database = f"bench_{label}_{unique}"
        with connect(base, autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {database}".encode())
        if topic is None:
            topic = f"bench.{label}.{unique}"
            spec = TopicsSpec({topic: TopicSpec(topic, partitions, 1, {"retention.ms": "-1"})}, {})
            topic_admin.apply(topic_admin.make_admin(base), spec, timeout_s=30)
        settings = load_settings(
            postgres={"url": with_database(base.postgres_dsn, database)},
            projections={"ledger_topic": topic, "redis_key_prefix": f"bench-{unique}",
                         "postgres_group": f"bench-pg-{unique}",
                         "redis_group": f"bench-redis-{unique}"},
        )  # fmt: skip
        migrate(settings)
        return cls(settings, topic, database, f"bench-{unique}", base)

    def env(self) -> dict[str, str]:
        import os

        env = dict(os.environ)
        p = self.settings.projections
        env.update({
            "CREDITLEDGER_POSTGRES__URL": self.settings.postgres_dsn,
            "CREDITLEDGER_PROJECTIONS__LEDGER_TOPIC": p.ledger_topic,
            "CREDITLEDGER_PROJECTIONS__REDIS_KEY_PREFIX": p.redis_key_prefix,
            "CREDITLEDGER_PROJECTIONS__POSTGRES_GROUP": p.postgres_group,
            "CREDITLEDGER_PROJECTIONS__REDIS_GROUP": p.redis_group,
        })  # fmt: skip
        env.pop("DATABASE_URL", None)
        return env

    def drop(self, delete_topic: bool = True) -> None:
        with connect(self.base, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {self.database} WITH (FORCE)".encode())
        client = connect_redis(self.settings)
        keys = list(client.scan_iter(match=f"{self.prefix}:*", count=5000))
        for start in range(0, len(keys), 5000):
            client.delete(*keys[start : start + 5000])
        client.close()
        if delete_topic:
            topic_admin.delete(topic_admin.make_admin(self.base), [self.topic], timeout_s=30)


def entry_records(count: int, users: int, seed: int = 7) -> Iterator[dict[str, Any]]:
    """Consistent ledger entries (gap-free seq, running balance) over ``users`` users."""
    rng = random.Random(seed)
    seq: dict[int, int] = {}
    balance: dict[int, int] = {}
    for n in range(count):
        u = rng.randrange(users)
        seq[u] = seq.get(u, 0) + 1
        grant = rng.random() < 0.1
        input_t, output_t = rng.randint(10, 4000), rng.randint(1, 800)
        amount = 5_000_000 if grant else -(input_t + 4 * output_t)
        balance[u] = balance.get(u, 0) + amount
        at = T0_MS + n * 10
        yield {
            "user_id": f"u{u}", "seq": seq[u], "event_id": f"e{seed}-{n}", "command_digest": "d",
            "kind": "purchase" if grant else "charge", "amount_micro": amount,
            "balance_after_micro": balance[u], "reference": f"o{n}" if grant else None,
            "scene": None if grant else "chat", "request_id": None, "conversation_id": None,
            "model_alias": None if grant else MODELS[n % 3],
            "upstream_model": None if grant else "m-2026",
            "input_tokens": 0 if grant else input_t, "output_tokens": 0 if grant else output_t,
            "cached_tokens": 0, "reasoning_tokens": 0, "usage_estimated": False,
            "price_rule_id": None if grant else "r", "price_rule_version": None if grant else 1,
            "occurred_at": at, "recorded_at": at + 3,
        }  # fmt: skip


def fill_topic(world: World, codec: AvroCodec, count: int, users: int) -> None:
    producer = make_producer(world.settings, **{"linger.ms": 50, "batch.size": 1_000_000})
    for record in tqdm(entry_records(count, users), total=count, desc="produce entries",
                       unit="entry", unit_scale=True, file=sys.stderr, mininterval=1):  # fmt: skip
        value = codec.encode(LEDGER_TOPIC, record, checked=False)
        while True:
            try:
                producer.produce(world.topic, key=record["user_id"].encode(), value=value)
                break
            except BufferError:
                producer.poll(0.05)
    if producer.flush(120):
        raise RuntimeError("entries not delivered")


def bench_replay(world: World, codec: AvroCodec, count: int) -> list[tuple[Any, ...]]:
    started = time.perf_counter()
    report = Replay(world.settings, codec, progress=True).run()
    total = time.perf_counter() - started
    return [
        ("replay into Postgres: load", f"{count:,} entries",
         f"{report.loaded / report.load_seconds:,.0f} entries/s",
         f"{report.load_seconds:.1f} s (Kafka -> decode -> COPY, unindexed)"),
        ("replay into Postgres: whole", f"{report.entries:,} entries, {report.accounts:,} accts",
         f"{report.entries / (total - report.redis_seconds):,.0f} entries/s",
         f"load {report.load_seconds:.1f} + build {report.build_seconds:.1f} + catch-up/swap "
         f"{report.swap_seconds:.1f} s"),
        ("replay: Redis rebuild", f"{report.redis_snapshots:,} snapshots",
         f"{report.redis_snapshots / report.redis_seconds:,.0f} snapshots/s",
         f"{report.redis_seconds:.1f} s"),
    ]  # fmt: skip


def bench_live(world: World, codec: AvroCodec, count: int) -> list[tuple[Any, ...]]:
    """The live Postgres projector (incremental upserts) over the first ``count`` entries."""
    with connect(world.settings, autocommit=True) as conn:
        conn.execute("TRUNCATE ledger_entries, accounts, consumption_hourly, projection_progress")
    projector = Projector(world.settings, PostgresSink(world.settings), codec,
                          group_id=world.settings.projections.postgres_group)  # fmt: skip
    consumer = make_consumer(world.settings, "bench-marks")
    parts = consumer.list_topics(world.topic, timeout=10).topics[world.topic].partitions
    consumer.close()
    projector.start(partitions=sorted(parts))
    share = count // len(parts)
    ends = {p: share for p in parts}
    started = time.perf_counter()
    with tqdm(total=share * len(parts), desc="live projector", unit="entry", unit_scale=True,
              file=sys.stderr) as bar:  # fmt: skip
        projector.run_until(ends, on_batch=bar.update)
    elapsed = time.perf_counter() - started
    projector.close()
    done = share * len(parts)
    return [("live Postgres projector", f"{done:,} entries", f"{done / elapsed:,.0f} entries/s",
             f"{elapsed:.1f} s, batches of {world.settings.projections.batch_max}")]  # fmt: skip


class RedisWatch:
    """Polls Redis for the users with entries in flight; records produce -> visible."""

    def __init__(self, settings: Settings, prefix: str) -> None:
        self.client = connect_redis(settings)
        self.prefix = prefix
        self.pending: dict[str, list[tuple[int, float]]] = {}
        self.latencies: list[float] = []

    def sent(self, user: str, seq: int) -> None:
        self.pending.setdefault(user, []).append((seq, time.monotonic()))

    def poll(self) -> None:
        users = list(self.pending)
        if not users:
            return
        pipe = self.client.pipeline(transaction=False)
        for user in users:
            pipe.hget(balance_key(self.prefix, user), "seq")
        now = time.monotonic()
        for user, value in zip(users, pipe.execute(), strict=True):
            seen = int(value or 0)
            waiting = self.pending[user]
            while waiting and waiting[0][0] <= seen:
                self.latencies.append((now - waiting.pop(0)[1]) * 1000)
            if not waiting:
                del self.pending[user]


def steady(rate: int, seconds: float, send: Any, watch: RedisWatch, desc: str) -> None:
    total = int(rate * seconds)
    started = time.monotonic()
    for n in tqdm(range(total), desc=desc, unit="entry", file=sys.stderr):
        while time.monotonic() < started + n / rate:
            watch.poll()
            time.sleep(0.0005)
        send(n)
    deadline = time.monotonic() + 30
    while watch.pending and time.monotonic() < deadline:
        watch.poll()
        time.sleep(0.001)


def start_projector(world: World, sink: str, log_name: str) -> ProcessGroup:
    """The projector in a process group of its own (its log: /tmp/<log_name>.log)."""
    group = ProcessGroup(Path("/tmp"), world.env())
    group.start(log_name, [sys.executable, "-m", "creditledger.cli", "project", sink])
    return group


def stop(group: ProcessGroup) -> None:
    group.stop_all()


def bench_freshness(
    world: World, codec: AvroCodec, rate: int, seconds: float
) -> list[tuple[Any, ...]]:
    """Entries produced straight to a ledger topic -> Redis snapshot visible."""
    projector = start_projector(world, "redis", "bench-freshness-redis")
    producer = make_producer(world.settings, **{"linger.ms": 0})
    watch = RedisWatch(world.settings, world.prefix)
    records = entry_records(10**7, 10_000, seed=11)
    try:
        # Warm up: the projector has joined its group once an entry shows up.
        first = next(records)
        producer.produce(world.topic, key=first["user_id"].encode(),
                         value=codec.encode(LEDGER_TOPIC, first, checked=False))  # fmt: skip
        producer.flush(5)
        watch.sent(first["user_id"], first["seq"])
        while watch.pending:
            watch.poll()
            time.sleep(0.01)
        watch.latencies.clear()

        def send(_n: int) -> None:
            record = next(records)
            producer.produce(world.topic, key=record["user_id"].encode(),
                             value=codec.encode(LEDGER_TOPIC, record, checked=False))  # fmt: skip
            producer.poll(0)
            watch.sent(record["user_id"], record["seq"])

        steady(rate, seconds, send, watch, f"freshness {rate}/s")
    finally:
        producer.flush(10)
        stop(projector)
    lat = watch.latencies
    return [(f"freshness: entry -> Redis, {rate}/s", f"{len(lat):,} entries",
             f"p50 {percentile(lat, 0.5):.1f} ms", f"p99 {percentile(lat, 0.99):.1f} ms "
             f"(max {max(lat):.0f} ms; {len(watch.pending)} not seen)")]  # fmt: skip


def bench_e2e(base: Settings, codec: AvroCodec, rate: int, seconds: float) -> list[tuple[Any, ...]]:
    """Charge command -> ledger worker -> credit.ledger.entries -> Redis projector -> Redis."""
    world = World.make(base, "e2e", topic=LEDGER_TOPIC)
    unique = uuid.uuid4().hex[:8]
    group = WorkerGroup(f"bench-{unique}", base)
    start_group_at_end(base, group.env()["CREDITLEDGER_LEDGER__APP_ID"])
    # The projector starts at the ledger's current end (earlier entries are not ours).
    client = connect_redis(world.settings)
    consumer = make_consumer(base, "bench-marks")
    parts = consumer.list_topics(LEDGER_TOPIC, timeout=10).topics[LEDGER_TOPIC].partitions
    ends = {p: consumer.get_watermark_offsets(TopicPartition(LEDGER_TOPIC, p))[1] for p in parts}
    consumer.close()
    client.hset(
        f"{world.prefix}:progress:{LEDGER_TOPIC}", mapping={str(p): o for p, o in ends.items()}
    )
    client.close()
    projector = start_projector(world, "redis", "bench-e2e-redis")
    producer = make_producer(base, **{"linger.ms": 0})
    watch = RedisWatch(world.settings, world.prefix)
    prefix = f"e2e{unique}"
    try:
        group.start("w1")
        warm = commands(prefix + "w", 10**6, 100)
        seqs: dict[str, int] = {}
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            command = next(warm)
            topic = command_topic(command)
            producer.produce(topic, key=command.user_id.encode(),
                             value=codec.encode(topic, command_to_record(command)))  # fmt: skip
            producer.flush(5)
            seqs[command.user_id] = seqs.get(command.user_id, 0) + 1
            watch.sent(command.user_id, seqs[command.user_id])
            time.sleep(0.2)
            watch.poll()
            if watch.latencies:
                break
        time.sleep(1.0)
        watch.poll()
        watch.pending.clear()
        watch.latencies.clear()
        items = commands(prefix, 10**7, 10_000, seed=3)

        def send(_n: int) -> None:
            command = next(items)
            topic = command_topic(command)
            producer.produce(topic, key=command.user_id.encode(),
                             value=codec.encode(topic, command_to_record(command)))  # fmt: skip
            producer.poll(0)
            seqs[command.user_id] = seqs.get(command.user_id, 0) + 1
            watch.sent(command.user_id, seqs[command.user_id])

        steady(rate, seconds, send, watch, f"e2e {rate}/s")
    finally:
        producer.flush(10)
        stop(projector)
        group.cleanup()
        world.drop(delete_topic=False)
    lat = watch.latencies
    return [(f"freshness e2e: command -> Redis, {rate}/s", f"{len(lat):,} commands",
             f"p50 {percentile(lat, 0.5):.1f} ms", f"p99 {percentile(lat, 0.99):.1f} ms "
             f"(max {max(lat):.0f} ms; through a ledger worker)")]  # fmt: skip


QUERY_DB = "bench_queries"


def ensure_query_data(base: Settings, entries: int, users: int, rebuild: bool) -> Settings:
    """``entries`` entries over ``users`` users, generated in SQL, over the last 90 days."""
    settings = load_settings(postgres={"url": with_database(base.postgres_dsn, QUERY_DB)})
    with connect(base, autocommit=True) as conn:
        exists = conn.execute(
            "SELECT 1 FROM pg_database WHERE datname = %s", (QUERY_DB,)
        ).fetchone()
        if exists and rebuild:
            conn.execute(f"DROP DATABASE {QUERY_DB} WITH (FORCE)".encode())
            exists = None
        if not exists:
            conn.execute(f"CREATE DATABASE {QUERY_DB}".encode())
    migrate(settings)
    with connect(settings, autocommit=True) as conn:
        # Kept while it still fits the windows: the entries end at generation time, so after
        # a day the 24h window (and later 7d, 30d) would measure less data than it should.
        # (User u0's newest entry is the newest of all: read it through the primary key.)
        row = conn.execute("SELECT count(*), (SELECT occurred_at > now() - interval '1 day' "
                           "FROM ledger_entries WHERE user_id = 'u0' ORDER BY seq DESC LIMIT 1) "
                           "FROM ledger_entries").fetchone()  # fmt: skip
        if row and int(row[0]) == entries and row[1]:
            return settings
        print(f"generating {entries:,} entries over {users:,} users in {QUERY_DB} "
              "(kept for later runs)...", file=sys.stderr)  # fmt: skip
        started = time.monotonic()
        conn.execute("TRUNCATE ledger_entries, accounts, consumption_hourly")
        conn.execute("SET maintenance_work_mem = '1GB'")
        conn.execute("ALTER TABLE ledger_entries DROP CONSTRAINT IF EXISTS ledger_entries_pkey, "
                     "DROP CONSTRAINT IF EXISTS ledger_entries_event_id_key")  # fmt: skip
        per_user = entries // users
        # Entry i of user u: every 10th a purchase, the rest charges; spread over 90 days.
        conn.execute(
            """
            INSERT INTO ledger_entries
            SELECT 'u' || u, s, 'ev-' || u || '-' || s, 'd',
                   CASE WHEN s %% 10 = 1 THEN 'purchase' ELSE 'charge' END,
                   CASE WHEN s %% 10 = 1 THEN 5000000 ELSE -(1000 + (u * 31 + s * 17) %% 9000) END,
                   0, NULL, 'chat', NULL, NULL, (ARRAY['small','large','vision'])[1 + s %% 3],
                   'm-2026', 100 + s, 20 + s, 0, 0, false, 'r', 1, t, t, u %% 6, s
            FROM generate_series(0, %(users)s - 1) AS u,
                 generate_series(1, %(per_user)s) AS s,
                 LATERAL (SELECT now() - ((%(per_user)s - s) * interval '90 days' / %(per_user)s)
                                 - (u %% 3600) * interval '1 second' AS t) AS times
            """,
            {"users": users, "per_user": per_user},
        )
        conn.execute("ALTER TABLE ledger_entries ADD CONSTRAINT ledger_entries_pkey "
                     "PRIMARY KEY (user_id, seq)")  # fmt: skip
        conn.execute("ALTER TABLE ledger_entries ADD CONSTRAINT ledger_entries_event_id_key "
                     "UNIQUE (event_id)")  # fmt: skip
        conn.execute(ACCOUNTS_BUILD.replace("{s}", "public").encode())
        conn.execute(CONSUMPTION_BUILD.replace("{s}", "public").encode())
        conn.execute("VACUUM ANALYZE")
        print(f"generated in {time.monotonic() - started:.0f} s", file=sys.stderr)
    return settings


def bench_queries(settings: Settings, users: int, samples: int,
                  concurrency: int) -> list[tuple[Any, ...]]:  # fmt: skip
    async def run() -> list[tuple[Any, ...]]:
        models = ReadModels(settings, pool_size=concurrency)
        await models.start()
        rng = random.Random(5)
        timings: dict[str, list[float]] = {}

        async def timed(label: str, call: Any) -> Any:
            started = time.perf_counter()
            result = await call
            timings.setdefault(label, []).append((time.perf_counter() - started) * 1000)
            return result

        async def one(user: str) -> None:
            await timed("consumption 30d", models.consumption(user, "30d"))
            await timed("consumption all", models.consumption(user, "all"))
            page = await timed("history, first page (20)", models.history(user, limit=20))
            await timed("history, next page (20)", models.history(user, cursor=page.next_cursor))
            await timed("balance (Postgres accounts)", models.postgres_balance(user))

        try:
            for u in range(50):  # warm the pool and the caches a little
                await one(f"u{u}")
            timings.clear()
            queue = [f"u{rng.randrange(users)}" for _ in range(samples)]

            async def worker() -> None:
                while queue:
                    await one(queue.pop())

            started = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(concurrency)))
            elapsed = time.perf_counter() - started
        finally:
            await models.close()
        calls = sum(len(v) for v in timings.values())
        return [(f"query: {label}", f"{len(v):,} calls, {concurrency} concurrent",
                 f"p50 {percentile(v, 0.5):.2f} ms", f"p99 {percentile(v, 0.99):.2f} ms")
                for label, v in timings.items()] + [
            ("queries: all of the above", f"{calls:,} calls", f"{calls / elapsed:,.0f} queries/s",
             f"{concurrency} concurrent clients, one pool")]  # fmt: skip

    return asyncio.run(run())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.projections", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    parser.add_argument("--entries", type=int, default=1_000_000, help="replay size")
    parser.add_argument("--users", type=int, default=100_000, help="users of the replay topic")
    parser.add_argument("--live-entries", type=int, default=300_000)
    parser.add_argument("--rate", type=int, default=1_000, help="freshness rate, entries/s")
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--query-entries", type=int, default=10_000_000)
    parser.add_argument("--query-users", type=int, default=100_000)
    parser.add_argument("--query-samples", type=int, default=4_000)
    parser.add_argument("--concurrency", type=int, default=10)
    parser.add_argument("--rebuild-queries", action="store_true")
    parser.add_argument("--parts", default="replay,live,freshness,e2e,queries")
    parser.add_argument("--quick", action="store_true", help="small sizes, to check it runs")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.quick:
        args.entries, args.users, args.live_entries, args.seconds = 50_000, 5_000, 20_000, 3
        args.query_entries, args.query_users, args.query_samples = 200_000, 2_000, 300
    parts = set(args.parts.split(","))
    base = load_settings()
    codec = load_codec(project_path(base.schemas.avro_dir))
    rows: list[tuple[Any, ...]] = []
    if parts & {"replay", "live"}:
        world = World.make(base, "replay")
        try:
            fill_topic(world, codec, args.entries, args.users)
            if "replay" in parts:
                rows += bench_replay(world, codec, args.entries)
            if "live" in parts:
                rows += bench_live(world, codec, min(args.live_entries, args.entries))
        finally:
            world.drop()
    if "freshness" in parts:
        world = World.make(base, "fresh")
        try:
            rows += bench_freshness(world, codec, args.rate, args.seconds)
        finally:
            world.drop()
    if "e2e" in parts:
        rows += bench_e2e(base, codec, args.rate, args.seconds)
    if "queries" in parts:
        settings = ensure_query_data(base, args.query_entries, args.query_users,
                                     args.rebuild_queries)  # fmt: skip
        rows += bench_queries(settings, args.query_users, args.query_samples, args.concurrency)
    print(render_table(["measure", "size", "result", "notes"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
