"""The plan plaza under load, and how long an import takes to earn its author credits.

    ./dev bench plaza [--seconds 10] [--clients 100] [--load wrk] [--imports-per-s 50]
                      [--import-seconds 20] [--quick]

Data: 100k published plans (English and Chinese titles, summaries and steps; one to
three of 60 tags) and 1M comments (threads up to five deep; a few plans with hundreds)
over 10k users, with about 5 likes per plan, generated into a database of the run's own
(about a minute). A real ``creditledger plaza serve`` process answers; 100 clients
(closed loop, keep-alive, a random user's signed token per request) hit one route at a
time: the newest plans, the newest of a tag, the most popular, a search (a word of the
generated vocabulary, English or Chinese), a plan's detail with its first 20 comments,
and a like (PUT, a random user and plan: mostly new likes, each a transaction with an
outbox row). The load comes from ``wrk`` when installed (``./dev bench`` installs it).

Then the whole reward path on the stack's Kafka: outbox relay, ``store event-rewards``,
a ledger worker and the Redis projector start, and imports are sent open loop at
``--imports-per-s`` (each by another user, of a plan whose author has not reached the
seeded rule's daily cap); for each, the time from sending the import until the author's
reward is in the Redis balance snapshot (what the store's /balance reads), polled every
5 ms. ``--quick``: 10k plans, 100k comments, 1k users. Needs the stack up.
"""

from __future__ import annotations

import json
import os
import random
import threading
import time
import urllib.parse
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from confluent_kafka import TopicPartition
from tqdm import tqdm

from bench.common import CpuMeter, bench_parser, http_load, load_tool, pct
from bench.ledger_load import start_group_at_end
from contracts.records import LEDGER_TOPIC
from contracts.redis_keys import balance_key, progress_key
from creditledger.tables import render_table
from kernel.db import connect
from kernel.redis import connect_redis
from kernel.settings import load_settings, project_path
from plaza.search import vector
from store.seed import REWARD_RULES
from streams import topic_admin
from streams.codec import load_codec
from streams.kafka_clients import make_consumer
from streams.topics import settings_topics
from testbed.ledger import WorkerGroup
from testbed.plaza import PlazaWorld
from testbed.topics import ScratchTopics

REWARD_PART = "import -> reward"
RULE = next(rule for rule in REWARD_RULES if rule["trigger_event"] == "plan.imported")

_ENGLISH = (
    "morning run budget garden reading sleep habit language guitar python cooking "
    "travel hiking marathon savings journal yoga chess piano painting baking study "
    "focus weekly routine meal prep interview career writing photography cycling "
    "swimming meditation spanish french history calculus kitchen balcony camping"
)
ENGLISH = tuple(_ENGLISH.split())
_CHINESE = (
    "周末 徒步 学习 计划 早起 读书 健身 旅行 烹饪 理财 英语 跑步 写作 摄影 瑜伽 编程 "
    "考试 复习 面试 减脂 睡眠 冥想 绘画 钢琴 骑行 露营 家务 育儿 园艺 书法"
)
CHINESE = tuple(_CHINESE.split())
# Words in no generated plan: a search for them finds nothing (the generated vocabulary's
# words are each in about half of the plans).
RARE = ("zebra", "xylophone", "quantum", "量子", "火山", "origami")
TAGS = [f"tag-{n:02d}" for n in range(40)] + ["general", "学习", "健身", "travel", "reading",
        "cooking", "英语", "理财", "morning", "hiking", "writing", "sleep", "career", "yoga",
        "编程", "家居", "摄影", "chess", "piano", "garden"]  # fmt: skip


@dataclass(frozen=True)
class Size:
    plans: int
    comments: int
    users: int


FULL, QUICK = Size(100_000, 1_000_000, 10_000), Size(10_000, 100_000, 1_000)


# -- data -----------------------------------------------------------------------------------


def _words(rng: random.Random, n: int) -> str:
    """n words of the vocabulary, English or Chinese, as a person might mix them."""
    if rng.random() < 0.5:
        return " ".join(rng.choice(ENGLISH) for _ in range(n))
    return "".join(rng.choice(CHINESE) for _ in range(n))


def _copy(conn: Any, statement: str, rows: Iterator[tuple[Any, ...]]) -> None:
    with conn.cursor().copy(statement) as copy:
        for row in rows:
            copy.write_row(row)


def generate(world: PlazaWorld, size: Size, rng: random.Random) -> tuple[dict[str, str], list[str]]:
    """Plans, tags, likes and comments into the world's database; ({plan: author}, users)."""
    users = [f"{world.unique}-u{n:05d}" for n in range(size.users)]
    now = datetime.now(UTC)
    plans: list[tuple[Any, ...]] = []
    for n in tqdm(range(size.plans), desc="plans", unit=" plans", mininterval=2):
        title, summary = _words(rng, rng.randint(2, 5)), _words(rng, rng.randint(5, 15))
        steps = [
            {
                "title": _words(rng, 2),
                "detail": _words(rng, rng.randint(3, 12)),
                "duration_minutes": rng.randint(5, 120),
            }
            for _ in range(rng.randint(2, 6))
        ]
        tags = sorted(set(rng.choices(TAGS, k=rng.randint(1, 3))))
        created = now - timedelta(seconds=size.plans - n)  # one a second, the last just now
        text = [f"{s['title']}\n{s['detail']}" for s in steps]
        plans.append((f"p_{n:024x}", rng.choice(users), title, summary, json.dumps(steps),
                      tags, vector(title, summary, *text), created))  # fmt: skip
    with connect(world.env_settings()) as conn, conn.transaction():
        _copy(conn, "COPY plaza_plans (plan_id, author_id, title, summary, steps, tags, status, "
              "search, created_at, updated_at) FROM STDIN",
              ((p, a, t, s, st, tg, "published", v, c, c) for p, a, t, s, st, tg, v, c
               in plans))  # fmt: skip
        _copy(conn, "COPY plaza_plan_tags (tag, created_at, plan_id) FROM STDIN",
              ((tag, p[7], p[0]) for p in plans for tag in p[5]))  # fmt: skip
        conn.execute("INSERT INTO plaza_tags (tag, plans) SELECT tag, count(*) FROM "
                     "plaza_plan_tags GROUP BY tag")  # fmt: skip
        conn.execute("INSERT INTO plaza_plan_counts (plan_id, published) SELECT plan_id, true "
                     "FROM plaza_plans")  # fmt: skip
        # About five per plan, skewed: a few plans have many (the popular list's head).
        _copy(conn, "COPY plaza_likes (plan_id, user_id, liked_at) FROM STDIN",
              _likes([p[0] for p in plans], users, rng, now))  # fmt: skip
        conn.execute(
            "UPDATE plaza_plan_counts p SET like_count = l.n FROM (SELECT plan_id, count(*) "
            "AS n FROM plaza_likes GROUP BY plan_id) l WHERE l.plan_id = p.plan_id"
        )
        _comments(conn, [p[0] for p in plans], users, size.comments, rng, now)
    # A settled table, as in production: the visibility map set and the statistics fresh
    # (right after a bulk load, autovacuum would do this during the measurements).
    with connect(world.env_settings(), autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE")
    return {p[0]: p[1] for p in plans}, users


def _likes(plan_ids: list[str], users: list[str], rng: random.Random,
           now: datetime) -> Iterator[tuple[Any, ...]]:  # fmt: skip
    for plan_id in tqdm(plan_ids, desc="likes", unit=" plans", mininterval=2):
        for user in set(rng.sample(users, int(rng.random() ** 4 * 25))):
            yield plan_id, user, now


def _comments(conn: Any, plan_ids: list[str], users: list[str], total: int,
              rng: random.Random, now: datetime) -> None:  # fmt: skip
    """``total`` comments: 1% of the plans hold a fifth of them (long threads), the rest
    spread; each replies to an earlier comment of its plan half of the time."""
    heavy = plan_ids[: max(1, len(plan_ids) // 100)]
    counts = dict.fromkeys(plan_ids, 0)
    for _ in range(total // 5):
        counts[rng.choice(heavy)] += 1
    for _ in range(total - total // 5):
        counts[rng.choice(plan_ids)] += 1
    next_id = 1

    def rows() -> Iterator[tuple[Any, ...]]:
        nonlocal next_id
        for plan_id, n in tqdm(counts.items(), desc="comments", unit=" plans", mininterval=2):
            paths: list[list[int]] = []
            for k in range(n):
                parent = rng.choice(paths) if paths and rng.random() < 0.5 else None
                if parent is not None and len(parent) >= 5:
                    parent = None
                path = [*(parent or []), next_id]
                paths.append(path)
                when = now - timedelta(seconds=n - k)
                yield (next_id, plan_id, parent[-1] if parent else None, path,
                       rng.choice(users), _words(rng, rng.randint(3, 20)), when)  # fmt: skip
                next_id += 1

    # COPY writes the identity column as given (as OVERRIDING SYSTEM VALUE would).
    _copy(conn, "COPY plaza_comments (comment_id, plan_id, parent_id, path, author_id, body, "
          "created_at) FROM STDIN", rows())  # fmt: skip
    conn.execute("SELECT setval(pg_get_serial_sequence('plaza_comments', 'comment_id'), %s)",
                 (next_id,))  # fmt: skip
    conn.execute("CREATE TEMP TABLE comment_counts (plan_id text, n bigint)")
    _copy(conn, "COPY comment_counts FROM STDIN", ((p, n) for p, n in counts.items() if n))
    conn.execute("UPDATE plaza_plan_counts p SET comment_count = c.n FROM comment_counts c WHERE "
                 "c.plan_id = p.plan_id")  # fmt: skip


# -- the latency table ------------------------------------------------------------------------


def routes(plan_ids: list[str], rng: random.Random) -> list[Route]:
    """(name, method, paths) per measured route."""
    sample = rng.sample(plan_ids, min(len(plan_ids), 5000))
    sample[:50] = plan_ids[:50]  # with some of the long threads
    base = "/plaza/plans"
    return [
        ("list newest", "GET", [f"{base}?limit=20"]),
        ("list newest, by tag", "GET", [f"{base}?limit=20&tag={_q(t)}" for t in TAGS]),
        ("list popular", "GET", [f"{base}?limit=20&sort=popular"]),
        ("search (en + zh)", "GET", [f"{base}?limit=20&q={_q(w)}" for w in (*ENGLISH, *CHINESE)]),
        ("search, rare words", "GET", [f"{base}?limit=20&q={_q(w)}" for w in RARE]),
        ("detail + first 20 comments", "GET", [f"{base}/{p}?comments=20" for p in sample]),
        ("like (PUT)", "PUT", [f"{base}/{p}/like" for p in sample]),
    ]


def _q(text: str) -> str:
    return urllib.parse.quote(text)


Route = tuple[str, str, list[str]]


def latency_table(world: PlazaWorld, tokens: list[bytes], clients: int, seconds: float,
                  tool: str, table: list[Route]) -> list[tuple[object, ...]]:  # fmt: skip
    process = world.processes["plaza"]
    meter = CpuMeter(process.pid)
    rows: list[tuple[object, ...]] = []
    for name, method, paths in table:
        http_load(tool, world.plaza_port, paths, tokens, clients, 2.0, method)  # warm up
        meter.start()
        result = http_load(tool, world.plaza_port, paths, tokens, clients, seconds, method)
        cpu = meter.stop(seconds)
        rows.append((name, result.ok, result.failed, f"{result.ok / seconds:.0f}",
                     f"{result.p50_ms:.1f}", f"{result.p99_ms:.1f}", f"{result.max_ms:.1f}",
                     "yes" if result.p99_ms <= 50 and not result.failed else "NO",
                     f"{cpu['server']:.0f}", f"{cpu['postgres']:.0f}",
                     f"{cpu['load generator']:.0f}"))  # fmt: skip
        print(rows[-1], flush=True)
    return rows


# -- import -> reward ---------------------------------------------------------------------


@contextmanager
def reward_path(world: PlazaWorld) -> Iterator[None]:
    """Relay, event rewards, a ledger worker and the Redis projector, all starting at the
    end of what their topics hold now (earlier runs' history is not this run's)."""
    settings = world.env_settings()
    workers = WorkerGroup(world.unique, settings)
    start_group_at_end(settings, workers.env()["CREDITLEDGER_LEDGER__APP_ID"])
    redis = connect_redis(settings)
    # The projector's stored progress is where it starts: the ledger's end.
    # (redis' stub types the mapping's keys invariantly: a dict[str, int] does not pass)
    redis.hset(progress_key(world.prefix, LEDGER_TOPIC),
               mapping=ledger_ends(settings))  # type: ignore[arg-type]  # fmt: skip
    redis.close()
    world.seed()
    try:
        workers.start("w1")
        world.start_relay()
        world.start_process("project-redis", "project", "redis")
        world.start_event_rewards()
        yield
    finally:
        workers.cleanup()


def ledger_ends(settings: Any) -> dict[str, int]:
    consumer = make_consumer(settings, f"bench-plaza-marks-{uuid.uuid4().hex[:8]}")
    try:
        partitions = consumer.list_topics(LEDGER_TOPIC, timeout=10).topics[LEDGER_TOPIC].partitions
        ends: dict[str, int] = {}
        for p in partitions:
            ends[str(p)] = consumer.get_watermark_offsets(TopicPartition(LEDGER_TOPIC, p), 10)[1]
        return ends
    finally:
        consumer.close()


def _send_imports(world: PlazaWorld, jobs: list[tuple[str, str]], rate: float,
                  sent: dict[str, float], failed: list[str]) -> None:  # fmt: skip
    """POST each (plan, importer) at ``rate`` per second from a few threads, open loop."""
    start = time.monotonic()
    lock = threading.Lock()
    cursor = iter(enumerate(jobs))

    def sender() -> None:
        while True:
            with lock:
                item = next(cursor, None)
            if item is None:
                return
            n, (plan_id, importer) = item
            time.sleep(max(0.0, start + n / rate - time.monotonic()))
            at = time.monotonic()
            status, _ = world.plaza("POST", f"/plans/{plan_id}/import", token=world.token(importer))
            with lock:
                (sent.__setitem__(plan_id, at) if status == 201 else failed.append(plan_id))

    threads = [threading.Thread(target=sender, daemon=True) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def warm_up(world: PlazaWorld, authors: dict[str, str], measured: set[str],
            users: list[str]) -> None:  # fmt: skip
    """One import, rewarded, before the measured ones: the processes that just started
    (a ledger worker joins its group and recovers in seconds) are then running, and the
    figures are the path's, not its start's."""
    plan_id, author = next((p, a) for p, a in authors.items() if a not in measured)
    importer = next(u for u in users if u != author and u not in measured)
    started = time.monotonic()
    status, _ = world.plaza("POST", f"/plans/{plan_id}/import", token=world.token(importer))
    assert status == 201, status
    redis = connect_redis(world.env_settings())
    try:
        while redis.hget(balance_key(world.prefix, author), "balance_micro") is None:
            if time.monotonic() - started > 180:
                raise SystemExit("the reward path did not reward a warm-up import in 180 s")
            time.sleep(0.05)
    finally:
        redis.close()
    print(f"reward path ready: the warm-up import rewarded after "
          f"{time.monotonic() - started:.1f} s", flush=True)  # fmt: skip


def reward_latency(world: PlazaWorld, authors: dict[str, str], users: list[str], rate: float,
                   seconds: float, rng: random.Random) -> tuple[list[float], int, int]:  # fmt: skip
    """Latencies (ms) from sending an import to its reward in Redis; (those, lost, failed)."""
    count = int(rate * seconds)
    chosen: dict[str, str] = {}  # plan -> author, one plan per author (the cap is per author)
    for plan_id in rng.sample(sorted(authors), len(authors)):
        if authors[plan_id] not in chosen.values():
            chosen[plan_id] = authors[plan_id]
        if len(chosen) == count:
            break
    jobs = [(p, rng.choice([u for u in rng.sample(users, 3) if u != a])) for p, a in chosen.items()]
    warm_up(world, authors, set(chosen.values()), users)
    sent: dict[str, float] = {}
    failed: list[str] = []
    sender = threading.Thread(target=_send_imports, args=(world, jobs, rate, sent, failed))
    sender.start()
    redis = connect_redis(world.env_settings())
    latencies: list[float] = []
    seen: set[str] = set()
    deadline = time.monotonic() + seconds + 120
    while time.monotonic() < deadline and (sender.is_alive() or len(seen) < len(sent)):
        pending = [p for p in list(sent) if p not in seen]
        pipe = redis.pipeline(transaction=False)
        for plan_id in pending:
            pipe.hget(balance_key(world.prefix, chosen[plan_id]), "balance_micro")
        now = time.monotonic()
        for plan_id, value in zip(pending, pipe.execute(), strict=True):
            if value is not None and int(value) >= RULE["amount_micro"]:
                seen.add(plan_id)
                latencies.append((now - sent[plan_id]) * 1000)
        time.sleep(0.005)
    sender.join()
    redis.close()
    return latencies, len(sent) - len(seen), len(failed)


def main() -> int:
    parser = bench_parser(__doc__)
    parser.add_argument("--clients", type=int, default=100, help="concurrent clients")
    parser.add_argument("--quick", action="store_true", help="10k plans, 100k comments, 1k users")
    parser.add_argument("--load", choices=("auto", "wrk", "python"), default="auto",
                        help="load generator (auto: wrk when installed, else python)")  # fmt: skip
    parser.add_argument("--imports-per-s", type=float, default=50.0, help="import rate")
    parser.add_argument("--import-seconds", type=float, default=20.0, help="how long to import")
    parser.add_argument("--seed", type=int, default=17, help="the generated data's seed")
    parser.add_argument("--only", metavar="WORD", help="only the parts whose name has WORD "
                        "(e.g. search, like, reward)")  # fmt: skip
    args = parser.parse_args()
    tool = load_tool(parser, args.load)
    size = QUICK if args.quick else FULL
    if args.imports_per_s * args.import_seconds > size.users:
        parser.error("more imports than authors: each author can earn only so much a day")
    rng = random.Random(args.seed)
    settings = load_settings()
    codec = load_codec(project_path(settings.schemas.avro_dir))
    unique = "bp" + uuid.uuid4().hex[:8]
    admin = topic_admin.make_admin(settings)
    # As every process does at its start: on a fresh stack the command and ledger topics do
    # not exist yet, and the reward path's groups cannot be started at their end.
    topic_admin.apply(admin, settings_topics(settings), timeout_s=30)
    scratch = ScratchTopics(admin, unique)
    world = PlazaWorld(settings, scratch, unique, codec, ledger_topic=LEDGER_TOPIC)
    try:
        t0 = time.monotonic()
        authors, users = generate(world, size, rng)
        print(f"generated in {time.monotonic() - t0:.0f} s", flush=True)
        world.start_plaza()
        tokens = [world.token(u, ttl_s=7200).encode() for u in users]
        table = [r for r in routes(sorted(authors), rng)
                 if args.only is None or args.only in r[0]]  # fmt: skip
        rows = latency_table(world, tokens, args.clients, args.seconds, tool, table)
        rewards = None
        if args.only is None or args.only in REWARD_PART:
            with reward_path(world):
                rewards = reward_latency(world, authors, users, args.imports_per_s,
                                         args.import_seconds, rng)  # fmt: skip
        _report(size, args, tool, rows, rewards)
    finally:
        world.cleanup()
        scratch.cleanup()
    return 0


def _report(size: Size, args: Any, tool: str, rows: list[tuple[object, ...]],
            rewards: tuple[list[float], int, int] | None) -> None:  # fmt: skip
    print()
    print(f"{size.plans:,} plans, {size.comments:,} comments, {size.users:,} users; "
          f"{args.clients} clients (closed loop, keep-alive, load from {tool}), "
          f"{args.seconds:.0f} s per row; {os.cpu_count()} cores shared by the plaza, "
          "Postgres and the load generator; CPU in % of one core")  # fmt: skip
    print(render_table(["route", "requests", "failed", "req/s", "p50 ms", "p99 ms", "max ms",
                        "p99 <= 50", "CPU plaza", "CPU pg", "CPU load"], rows))  # fmt: skip
    if rewards is None:
        return
    latencies, lost, failed = rewards
    print()
    print(
        f"import -> reward in the author's Redis balance, {args.imports_per_s:.0f} imports/s "
        f"for {args.import_seconds:.0f} s (relay, event rewards, ledger worker, projector)"
    )
    print(render_table(["imports", "rewarded", "not seen", "failed", "p50 ms", "p99 ms",
                        "max ms"], [(len(latencies) + lost, len(latencies), lost, failed,
                        f"{pct(latencies, 0.5):.0f}", f"{pct(latencies, 0.99):.0f}",
                        f"{max(latencies, default=float('nan')):.0f}")]))  # fmt: skip


if __name__ == "__main__":
    import sys

    sys.exit(main())
