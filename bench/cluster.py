"""One broker against a three-node cluster (production profile: RF 3, min.insync 2),
and what a broker's death costs.

    ./dev bench cluster [--commands 100000] [--users 10000] [--seconds 20] [--quick]

Prints one table, both Kafkas measured in the same run:
- fold: commands folded per second by one ledger worker, end to end (commands already in
  Kafka -> entries on the ledger topic), as ``bench.ledger`` measures it;
- proxy: the added latency of a call through the whole pipeline (proxy, outbox, relay,
  worker, both projectors running), p50 and p99 of calls by 4 SDK clients, less the
  fake upstream's own p50 measured just before;
- broker failure (cluster only): under that load, SIGKILL the leader of ledger partition
  0, start it again once entries flow, wait until nothing is under-replicated, then the
  same for a second broker. For each: the longest time with no new ledger entry, and the
  p99 added latency of the calls made from the kill until entries flowed again.

The local stack must be up (`creditledger stack up`); the cluster is started here on its
own ports (29092, 29192, 29292) and wiped afterwards.
"""

from __future__ import annotations

import argparse
import signal
import statistics
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import openai

from bench.ledger import percentile, throughput
from bench.ledger_load import start_group_at_end
from contracts.records import LEDGER_TOPIC
from creditledger.tables import render_table
from kernel.db import connect
from kernel.settings import Settings, load_settings, project_path
from streams import topic_admin
from streams.codec import AvroCodec, load_codec
from streams.topics import settings_topics
from testbed.cluster import Cluster, LedgerClock, cluster_settings
from testbed.ledger import WorkerGroup
from testbed.load import PROMPT, Load, grant
from testbed.proxy import ProxyWorld, wait_for
from testbed.topics import ScratchTopics

Row = tuple[str, str, str, str]


@contextmanager
def pipeline(settings: Settings, codec: AvroCodec) -> Iterator[tuple[ProxyWorld, list[str]]]:
    """Proxy, relay, one ledger worker and both projectors on ``settings``' Kafka, and four
    users with credit."""
    unique = uuid.uuid4().hex[:10]
    scratch = ScratchTopics(topic_admin.make_admin(settings), unique)
    world = ProxyWorld(settings, scratch, unique, codec, ledger_topic=LEDGER_TOPIC,
                       proxy_settings={"retry_serves_max": 100})  # fmt: skip
    workers = WorkerGroup(unique, world.env_settings())
    # A new group folds from the commands' end, not the history earlier runs left there.
    start_group_at_end(settings, workers.env()["CREDITLEDGER_LEDGER__APP_ID"])
    try:
        workers.start("w1", supervised=True)
        world.start_proxy()
        world.start_relay()
        world.start_projector("postgres")
        world.start_projector("redis")
        users = [f"{unique}-u{n}" for n in range(4)]
        grant(world, users, amount_micro=10**12)

        def granted() -> bool:
            with connect(world.env_settings()) as conn:
                row = conn.execute("SELECT count(*) FROM accounts WHERE user_id = ANY(%s)",
                                   (users,)).fetchone()  # fmt: skip
            return row is not None and int(row[0]) == len(users)

        wait_for("the grants in Postgres", granted, 180, world)
        yield world, users
    finally:
        workers.cleanup()
        world.cleanup()
        scratch.cleanup()


def upstream_p50(world: ProxyWorld, calls: int = 200) -> float:
    """The fake upstream's own latency through the same SDK (ms): subtracted from the
    proxy's to give what the proxy adds."""
    client = openai.OpenAI(base_url=f"{world.upstream}/v1", api_key="x", max_retries=0)
    timings = []
    for _ in range(calls):
        t0 = time.monotonic()
        client.chat.completions.create(model="fake-small", messages=PROMPT)
        timings.append((time.monotonic() - t0) * 1000)
    client.close()
    return statistics.median(timings)


def added(load: Load, floor_ms: float, start: float = 0.0, end: float = float("inf")) -> str:
    timings = [s * 1000 for t, s in load.latencies if start <= t <= end]
    if not timings:
        return "no call finished"
    p50, p99 = percentile(timings, 0.5) - floor_ms, percentile(timings, 0.99) - floor_ms
    return f"p50 {p50:.1f} ms / p99 {p99:.1f} ms ({len(timings)} calls)"


def proxy_latency(label: str, settings: Settings, codec: AvroCodec, seconds: float) -> Row:
    with pipeline(settings, codec) as (world, users):
        floor = upstream_p50(world)
        with Load(world, users) as load:
            time.sleep(seconds)
        return (
            f"proxy added latency, {label}",
            "4 SDK clients, whole pipeline",
            added(load, floor),
            f"upstream p50 {floor:.1f} ms subtracted",
        )


def failures(cluster: Cluster, codec: AvroCodec) -> list[Row]:
    rows: list[Row] = []
    with pipeline(cluster.settings, codec) as (world, users):
        floor = upstream_p50(world)
        with LedgerClock(cluster.settings, 6) as clock, Load(world, users) as load:
            clock.wait_for_entries(after=time.monotonic(), count=50, timeout_s=60)
            killed: list[int] = []
            for which in ("leader of ledger partition 0", "a second broker"):
                node = next(cluster.leader(LEDGER_TOPIC, p) for p in range(6)
                            if cluster.leader(LEDGER_TOPIC, p) not in killed)  # fmt: skip
                killed.append(node)
                t_kill = time.monotonic()
                cluster.kill(node)
                clock.wait_for_entries(after=time.monotonic(), count=50, timeout_s=300)
                t_flow = time.monotonic()
                pause = clock.longest_gap(t_kill, t_flow)
                cluster.restart()
                healed = cluster.wait_fully_replicated()
                time.sleep(3)
                rows.append((f"SIGKILL {which} (node {node})", "3 brokers, RF 3, under load",
                             f"{pause:.1f} s with no new ledger entry",
                             f"calls meanwhile: {added(load, floor, t_kill, t_flow)}; "
                             f"restarted, in sync after {healed:.0f} s"))  # fmt: skip
        assert not load.refused, load.refused[:3]
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.cluster",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--commands", type=int, default=100_000)
    parser.add_argument("--users", type=int, default=10_000)
    parser.add_argument("--seconds", type=float, default=20.0, help="per latency measurement")
    parser.add_argument("--quick", action="store_true", help="small sizes, to check it runs")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the `finally` blocks
    if args.quick:
        args.commands, args.seconds = 10_000, 5.0
    stack = load_settings()
    codec = load_codec(project_path(stack.schemas.avro_dir))
    topic_admin.apply(topic_admin.make_admin(stack), settings_topics(stack), timeout_s=30)
    cluster = Cluster(cluster_settings(stack, Path("/tmp/creditledger-bench-cluster")))
    rows: list[Row] = []
    try:
        cluster.up()
        for label, settings in (("1 broker, RF 1", stack), ("3 brokers, RF 3", cluster.settings)):
            rate, elapsed = throughput(settings, codec, 1, args.commands, args.users)
            rows.append(
                (
                    f"fold, 1 worker, {label}",
                    f"{args.commands:,} cmds",
                    f"{rate:,.0f} commands/s",
                    f"{elapsed:.1f} s first->last entry",
                )
            )
        for label, settings in (("1 broker, RF 1", stack), ("3 brokers, RF 3", cluster.settings)):
            rows.append(proxy_latency(label, settings, codec, args.seconds))
        rows += failures(cluster, codec)
    finally:
        cluster.down()
    print(render_table(["measure", "setup", "result", "notes"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
