"""Ledger fold benchmarks on real Kafka (and the naive Postgres baseline).

    .venv/bin/python -m bench.ledger [--commands 200000] [--users 10000]
                                     [--restart-accounts 1000000] [--quick]
    .venv/bin/python -m bench.ledger --recovery [--sizes 1000000,5000000,10000000]
                                     [--accounts 1000000] [--quick]

Prints one table:
- throughput: commands folded per second by one worker, then by two, end to
  end (commands already in Kafka -> entries visible on the ledger topic);
- baseline: the same kind of commands applied to Postgres one transaction per
  command (update balance, insert entry, unique event_id), and the ratio;
- latency: command produced -> entry visible, p50/p99, at a steady 1,000/s;
- restart: a worker with 1M accounts in its state is SIGKILLed and restarted;
  time from restart to the first new entry (state kept locally), and the same
  with the local state lost (restored from a snapshot, or the whole ledger folded).

``--recovery`` prints the recovery table instead (bench/ledger_recovery.py): cold
starts without local state at 1M, 5M and 10M ledger entries over 1M accounts.

Each run uses a fresh consumer group whose offsets start at the current end
of the command topics, so earlier data in the stack does not count. Needs the
stack up (`creditledger stack up`).
"""

from __future__ import annotations

import argparse
import shutil
import signal
import statistics
import sys
import time
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
from tqdm import tqdm

from bench.ledger_load import LedgerTail, commands, produce, start_group_at_end
from contracts.commands import Charge, Command, Grant
from contracts.records import (
    GRANT_TOPIC,
    command_to_record,
    command_topic,
)
from creditledger.tables import render_table
from kernel.settings import Settings, load_settings, project_path
from streams import topic_admin
from streams.codec import AvroCodec, load_codec
from streams.kafka_clients import make_producer
from streams.topics import settings_topics
from testbed.ledger import WorkerGroup
from testbed.workload import FRESH_T0_MS


def throughput(settings: Settings, codec: AvroCodec, workers: int, count: int,
               users: int) -> tuple[float, float]:  # fmt: skip
    """Commands/s while folding, and seconds from first to last entry."""
    unique = uuid.uuid4().hex[:8]
    prefix = f"tp{unique}"
    group = WorkerGroup(f"bench-{unique}", settings)
    start_group_at_end(settings, group.env()["CREDITLEDGER_LEDGER__APP_ID"])
    produce(settings, codec, commands(prefix, count, users), count, f"load {workers}w")
    tail = LedgerTail(settings, codec, prefix)
    try:
        for n in range(workers):
            group.start(f"w{n + 1}")
        first = last = 0.0
        seen = 0
        deadline = time.monotonic() + 900
        with tqdm(total=count, desc=f"fold {workers}w", unit="cmd", file=sys.stderr) as bar:
            while seen < count and time.monotonic() < deadline:
                for name in group.processes:
                    if not group.alive(name):
                        raise SystemExit(f"worker {name} died:\n{group.tail(name)}")
                batch = tail.poll(0.2)
                if batch:
                    first = first or batch[0][0]
                    last = batch[-1][0]
                    seen += len(batch)
                    bar.update(len(batch))
        if seen < count:
            raise SystemExit(f"only {seen} of {count} entries after 900 s\n{group.tail('w1')}")
        elapsed = last - first
        return count / elapsed, elapsed
    finally:
        tail.close()
        group.cleanup()


def baseline(settings: Settings, count: int, users: int) -> float:
    """Postgres, one transaction per command: the design a ledger usually starts with."""
    prefix = f"pg{uuid.uuid4().hex[:8]}"
    with psycopg.connect(settings.postgres_dsn, autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS bench_entries, bench_accounts")
        conn.execute("CREATE TABLE bench_accounts (user_id text PRIMARY KEY, "
                     "balance_micro bigint NOT NULL, seq bigint NOT NULL)")  # fmt: skip
        conn.execute("CREATE TABLE bench_entries (user_id text, seq bigint, event_id text UNIQUE, "
                     "amount_micro bigint NOT NULL, balance_after_micro bigint NOT NULL, "
                     "PRIMARY KEY (user_id, seq))")  # fmt: skip
    items = list(commands(prefix, count, users))
    with psycopg.connect(settings.postgres_dsn) as conn:
        started = time.perf_counter()
        for command in tqdm(items, desc="postgres baseline", unit="cmd", file=sys.stderr,
                            mininterval=1):  # fmt: skip
            signed = -command.amount_micro if isinstance(command, Charge) else command.amount_micro
            with conn.transaction():
                if conn.execute("SELECT 1 FROM bench_entries WHERE event_id = %s",
                                (command.event_id,)).fetchone():  # fmt: skip
                    continue
                row = conn.execute(
                    "INSERT INTO bench_accounts AS a VALUES (%s, %s, 1) ON CONFLICT (user_id) "
                    "DO UPDATE SET balance_micro = a.balance_micro + EXCLUDED.balance_micro, "
                    "seq = a.seq + 1 RETURNING balance_micro, seq",
                    (command.user_id, signed),
                ).fetchone()
                assert row is not None
                conn.execute(
                    "INSERT INTO bench_entries VALUES (%s, %s, %s, %s, %s)",
                    (command.user_id, row[1], command.event_id, signed, row[0]),
                )
        elapsed = time.perf_counter() - started
    with psycopg.connect(settings.postgres_dsn, autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS bench_entries, bench_accounts")
    return count / elapsed


def latency(settings: Settings, codec: AvroCodec, rate: int, seconds: int) -> list[float]:
    """Produce at a steady rate with one worker running; ms from produce to entry seen."""
    unique = uuid.uuid4().hex[:8]
    prefix = f"lt{unique}"
    group = WorkerGroup(f"bench-{unique}", settings)
    start_group_at_end(settings, group.env()["CREDITLEDGER_LEDGER__APP_ID"])
    tail = LedgerTail(settings, codec, prefix)
    producer = make_producer(settings, **{"linger.ms": 0})
    sent_at: dict[bytes, float] = {}
    latencies: list[float] = []
    try:
        group.start("w1")
        # Warm up until the worker folds, so start-up is not counted as latency.
        warm = commands(prefix + "w", 10**6, 100)
        while not tail.poll(0.2):
            command = next(warm)
            producer.produce(command_topic(command), key=command.user_id.encode(),
                             value=codec.encode(command_topic(command),
                                                command_to_record(command)))  # fmt: skip
            producer.flush(5)
        total = rate * seconds
        items = commands(prefix, total, 10_000, seed=2)
        started = time.monotonic()
        for n, command in enumerate(tqdm(items, total=total, desc=f"steady {rate}/s",
                                         unit="cmd", file=sys.stderr)):  # fmt: skip
            topic = command_topic(command)
            value = codec.encode(topic, command_to_record(command))
            while time.monotonic() < started + n / rate:
                for seen_at, event_id in tail.poll(0.0):
                    if event_id in sent_at:
                        latencies.append((seen_at - sent_at.pop(event_id)) * 1000)
                time.sleep(0.0005)
            producer.produce(topic, key=command.user_id.encode(), value=value)
            producer.poll(0)
            sent_at[command.event_id.encode()] = time.monotonic()
        deadline = time.monotonic() + 60
        while sent_at and time.monotonic() < deadline:
            for seen_at, event_id in tail.poll(0.05):
                if event_id in sent_at:
                    latencies.append((seen_at - sent_at.pop(event_id)) * 1000)
        return latencies
    finally:
        producer.flush(10)
        tail.close()
        group.cleanup()


def restart(settings: Settings, codec: AvroCodec, accounts: int) -> tuple[float, float, float]:
    """Fold ``accounts`` one-command accounts, then SIGKILL and restart the worker twice:
    once with its local state, once without. Returns (fold s, warm restart s, cold s)."""
    unique = uuid.uuid4().hex[:8]
    prefix = f"rs{unique}"
    group = WorkerGroup(f"bench-{unique}", settings)
    start_group_at_end(settings, group.env()["CREDITLEDGER_LEDGER__APP_ID"])

    def one_per_user() -> Iterator[Command]:
        for n in range(accounts):
            yield Grant(f"{prefix}-e{n}", f"{prefix}-u{n}", "reward", 1_000_000, "signup",
                        None, FRESH_T0_MS + n, "bench")  # fmt: skip

    produce(settings, codec, one_per_user(), accounts, "load accounts")
    tail = LedgerTail(settings, codec, prefix)
    producer = make_producer(settings)
    try:
        t0 = time.monotonic()
        group.start("w1")
        seen = 0
        with tqdm(total=accounts, desc="fold accounts", unit="cmd", file=sys.stderr) as bar:
            while seen < accounts and time.monotonic() - t0 < 1800:
                got = len(tail.poll(0.2))
                seen += got
                bar.update(got)
        fold_s = time.monotonic() - t0

        def time_to_first_entry(label: str, lose_state: bool) -> float:
            group.kill("w1")
            if lose_state:
                shutil.rmtree(group.root / "w1", ignore_errors=True)
            group.start("w1")
            restarted = time.monotonic()
            probe = Grant(f"{prefix}-{label}", f"{prefix}-u0", "reward", 1, "probe", None,
                          FRESH_T0_MS, "bench")  # fmt: skip
            producer.produce(GRANT_TOPIC, key=probe.user_id.encode(),
                             value=codec.encode(GRANT_TOPIC, command_to_record(probe)))  # fmt: skip
            producer.flush(10)
            while time.monotonic() - restarted < 1800:
                if any(event_id == probe.event_id.encode() for _, event_id in tail.poll(0.1)):
                    return time.monotonic() - restarted
            raise SystemExit(f"no entry after restart ({label})\n{group.tail('w1')}")

        warm = time_to_first_entry("warm", lose_state=False)
        cold = time_to_first_entry("cold", lose_state=True)
        return fold_s, warm, cold
    finally:
        producer.flush(10)
        tail.close()
        group.cleanup()


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.ledger",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--commands", type=int, default=200_000)
    parser.add_argument("--users", type=int, default=10_000)
    parser.add_argument("--baseline-commands", type=int, default=20_000)
    parser.add_argument("--latency-rate", type=int, default=1_000)
    parser.add_argument("--latency-seconds", type=int, default=20)
    parser.add_argument("--restart-accounts", type=int, default=1_000_000)
    parser.add_argument("--quick", action="store_true", help="small sizes, to check it runs")
    parser.add_argument("--recovery", action="store_true",
                        help="only the recovery table (bench/ledger_recovery.py): cold starts "
                        "without local state at each of --sizes ledger entries")  # fmt: skip
    parser.add_argument(
        "--sizes",
        default="1000000,5000000,10000000",
        help="ledger sizes (entries) for --recovery, comma-separated",
    )
    parser.add_argument(
        "--accounts",
        type=int,
        default=1_000_000,
        help="users the --recovery commands are spread over",
    )
    parser.add_argument("--compare", type=int, default=500_000,
                        help="--recovery: then fold this many commands with snapshots off, "
                        "and as many on, for the fold's rate side by side (0: skip)")  # fmt: skip
    args = parser.parse_args(argv)
    # SIGTERM must run the `finally` blocks: they stop the worker processes,
    # which live in sessions of their own and would otherwise go on folding.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.quick:
        args.commands, args.baseline_commands = 20_000, 2_000
        args.latency_seconds, args.restart_accounts = 5, 20_000
    settings = load_settings()
    codec = load_codec(project_path(settings.schemas.avro_dir))
    # As every process does at its start: on a fresh stack the command topics do not exist
    # yet, and a group cannot be started at their end.
    topic_admin.apply(topic_admin.make_admin(settings),
                      settings_topics(settings), timeout_s=30)  # fmt: skip
    if args.recovery:
        from bench.ledger_recovery import recovery
        from bench.ledger_recovery import rows as recovery_rows

        sizes = [int(size) for size in args.sizes.split(",")]
        if args.quick:
            sizes, args.accounts = [size // 100 for size in sizes], args.accounts // 100
        compare = 5_000 if args.quick else args.compare
        steps, rates = recovery(settings, codec, sizes, args.accounts, compare)
        print(render_table(["measure", "size", "result", "notes"],
                           recovery_rows(steps, args.accounts, compare, rates)))  # fmt: skip
        return 0
    rows: list[tuple[Any, ...]] = []

    one, one_s = throughput(settings, codec, 1, args.commands, args.users)
    rows.append(("fold, 1 worker", f"{args.commands:,} cmds / {args.users:,} users",
                 f"{one:,.0f} commands/s", f"{one_s:.1f} s first->last entry"))  # fmt: skip
    two, two_s = throughput(settings, codec, 2, args.commands, args.users)
    rows.append(("fold, 2 workers", f"{args.commands:,} cmds / {args.users:,} users",
                 f"{two:,.0f} commands/s", f"{two_s:.1f} s first->last entry"))  # fmt: skip
    pg = baseline(settings, args.baseline_commands, args.users)
    rows.append(("baseline: Postgres, 1 tx/command", f"{args.baseline_commands:,} cmds",
                 f"{pg:,.0f} commands/s", f"1 worker = {one / pg:.1f}x baseline"))  # fmt: skip
    lat = latency(settings, codec, args.latency_rate, args.latency_seconds)
    rows.append((f"latency at {args.latency_rate}/s", f"{len(lat):,} commands",
                 f"p50 {percentile(lat, 0.5):.1f} ms", f"p99 {percentile(lat, 0.99):.1f} ms "
                 f"(max {max(lat):.0f}, mean {statistics.mean(lat):.1f})"))  # fmt: skip
    fold_s, warm, cold = restart(settings, codec, args.restart_accounts)
    rows.append((f"restart, {args.restart_accounts:,} accounts in state", "SIGKILL + start",
                 f"{warm:.1f} s to first entry", f"state lost: {cold:.1f} s; "
                 f"initial fold {fold_s:.0f} s"))  # fmt: skip
    print(render_table(["measure", "size", "result", "notes"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
