"""The main job of the README's first command.

Bring the stack up, apply the topics, send one event of every type through real
Kafka and back, then run a real ledger worker over a few commands (with a
duplicate, a conflict, an invalid one and a debt) and print the ledger and
the dead letters; then run both projectors and read the balances, the
consumption and the history back from Redis and Postgres, and verify them
against the ledger; then send real traffic through the LLM proxy (see
:mod:`creditledger.proxy_demo`) and read the charges back from both stores; then
buy a pack in the credit store and earn a reward on the plan plaza
(:mod:`creditledger.store_demo`, :mod:`creditledger.plaza_demo`).
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from agents import ops
from contracts.cloudevents import command_headers
from contracts.commands import Charge, Command, Entry, Grant
from contracts.records import LEDGER_TOPIC, command_to_record, command_topic
from creditledger.proxy_demo import proxy_demo
from creditledger.tables import render_table
from kernel.settings import Settings, project_path
from stack import launcher
from streams import topic_admin
from streams.codec import AvroCodec, load_codec
from streams.examples import example_events
from streams.kafka_clients import make_producer, partition_of
from streams.roundtrip import round_trip
from streams.topics import TopicSpec, TopicsSpec, settings_topics


def run_demo(settings: Settings) -> bool:
    """Run the demo, print as it goes; True when every round trip matched."""
    t0 = time.monotonic()
    admin = _stack_and_topics(settings, t0)
    codec = load_codec(project_path(settings.schemas.avro_dir))
    stamp = datetime.now(UTC).replace(microsecond=0)
    passed = {"3 round trips": _round_trips(settings, admin, codec, stamp)}
    print()
    passed["4 ledger"], users = ledger_demo(settings, codec, stamp)
    print()
    passed["5 projections"] = projections_demo(settings, codec, users)
    print()
    passed["6-8 proxy, store, plaza"] = proxy_demo(settings, codec, stamp.strftime("%H%M%S"))
    ok = all(passed.values())
    # Name the failed steps on the last lines: that is what a truncated CI log still shows.
    failed = "" if ok else ": step " + ", ".join(step for step, good in passed.items() if not good)
    print(f"\ndemo {'passed' if ok else 'FAILED'} in {time.monotonic() - t0:.1f} s{failed}")
    print("the stack keeps running; stop it with: .venv/bin/creditledger stack down")
    return ok


def _stack_and_topics(settings: Settings, t0: float) -> Any:
    """Steps 1 and 2: the stack up, topics.yaml applied; the topic admin client."""
    print("== 1. stack up (Kafka KRaft, Postgres, Redis on loopback)")
    report = launcher.up(settings)
    print(render_table(["service", "state", "address", "log"],
                       [(s.name, s.state, s.address, s.log) for s in report]))  # fmt: skip
    print(f"stack ready in {time.monotonic() - t0:.1f} s\n")
    print("== 2. topics apply (topics.yaml)")
    spec = settings_topics(settings)
    admin = topic_admin.make_admin(settings)
    applied = topic_admin.apply(admin, spec, settings.kafka.request_timeout_ms / 1000)
    print(render_table(
        ["topic", "partitions", "cleanup.policy", "retention.ms", "result"],
        [(p.name, spec[p.name].partitions, spec[p.name].config.get("cleanup.policy", "-"),
          spec[p.name].config.get("retention.ms", "-"), p.action) for p in applied],
    ))  # fmt: skip
    print()
    return admin


def _round_trips(settings: Settings, admin: Any, codec: AvroCodec, stamp: datetime) -> bool:
    """Step 3: one event of each type through a throw-away topic and back."""
    print("== 3. round trip of each event type (Avro single-object encoding, real Kafka,")
    print("      through a throw-away topic so that no sample reaches the real ones)")
    events = example_events(user_id="demo-user", at=stamp, suffix=stamp.strftime("%Y%m%d%H%M%S"))
    scratch = f"demo.roundtrip.{stamp.strftime('%Y%m%d%H%M%S')}"
    scratch_spec = TopicsSpec({scratch: TopicSpec(scratch, 1, 1, {"retention.ms": "3600000"})}, {})
    timeout_s = settings.kafka.request_timeout_ms / 1000
    topic_admin.apply(admin, scratch_spec, timeout_s)
    try:
        results = round_trip(settings, codec, events, topic=scratch)
    finally:
        topic_admin.delete(admin, [scratch], timeout_s)
    print(render_table(
        ["event type", "key", "partition", "offset", "bytes", "ms", "decoded == sent"],
        [(r.event_type, r.key, r.partition, r.offset, r.size_bytes, f"{r.milliseconds:.1f}",
          "yes" if r.equal else "NO") for r in results],
    ))  # fmt: skip
    print("(ms: produce, acks=all, until read back and decoded; the first send also pays for")
    print(" the idempotent producer's start-up: connection and producer id)")
    return all(r.equal for r in results)


def _demo_commands(run: str) -> list[tuple[Command, str]]:
    """(command, what the ledger must do with it) for two demo users."""
    alice, bob = f"demo-{run}-alice", f"demo-{run}-bob"
    t = time.time_ns() // 1_000_000  # now: inside the ledger's idempotency window

    def charge(event: str, user: str, amount: int) -> Charge:
        return Charge(f"{run}-{event}", user, "chat", None, None, "small", "small-2026",
                      1000, 200, 0, 0, False, "small", 1, amount, t, "demo")  # fmt: skip

    grant_alice = Grant(f"{run}-g1", alice, "purchase", 10_000_000, "order-1", None, t, "demo")
    first_charge = charge("c1", alice, 1_800)
    return [
        (grant_alice, "applied"),
        (first_charge, "applied"),
        (charge("c2", alice, 2_600), "applied"),
        (first_charge, "duplicate: same event_id, same content"),
        (dataclasses.replace(first_charge, amount_micro=9_999), "rejected: idempotency_conflict"),
        (Grant(f"{run}-g2", bob, "reward", 1_000_000, "signup", None, t, "demo"), "applied"),
        (charge("c3", bob, 1_250_000), "applied (post-paid: bob goes into debt)"),
        (charge("c4", bob, -5), "rejected: invalid"),
    ]


def ledger_demo(settings: Settings, codec: AvroCodec, stamp: datetime) -> tuple[bool, list[str]]:
    """Step 2: a real ledger worker folds a few commands; balances come from the ledger."""
    spec_partitions = settings_topics(settings)[LEDGER_TOPIC].partitions
    print("== 4. the ledger: a worker folds commands exactly once per event_id")
    run = stamp.strftime("%H%M%S")
    commands = _demo_commands(run)
    log_file = settings.stack.state_dir / "demo-worker.log"
    log_start = log_file.stat().st_size if log_file.exists() else 0  # this run's lines follow
    with log_file.open("ab") as log:
        worker = subprocess.Popen(
            # Unsupervised: the demo watches it, and names its crash reason if it dies.
            [sys.executable, "-m", "creditledger.cli", "worker", "--name", "demo",
             "--no-supervise"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        producer = make_producer(settings)
        for command, _ in commands:
            topic = command_topic(command)
            producer.produce(topic, key=command.user_id.encode(), headers=command_headers(command),
                             value=codec.encode(topic, command_to_record(command)))  # fmt: skip
        producer.flush(30)
        print(render_table(["command", "user", "amount_micro", "expected"],
                           [(c.event_id, c.user_id, c.amount_micro, what)
                            for c, what in commands]))  # fmt: skip
        users = sorted({c.user_id for c, _ in commands})
        expected_entries = sum(1 for _, what in commands if what.startswith("applied"))
        partitions = sorted({partition_of(user, spec_partitions) for user in users})
        entries = _wait_for_entries(settings, codec, users, partitions, expected_entries, worker)
    finally:
        worker.terminate()
        worker.wait(timeout=60)
    if entries is None:
        if worker.returncode not in (None, 0, -15):  # it died by itself, not by terminate()
            print(f"the worker exited with code {worker.returncode}: "
                  f"{_crash_reason(log_file, log_start)}; see {log_file}")  # fmt: skip
        else:
            print(f"the worker did not fold the commands in time; see {log_file}")
        return False, users
    print()
    print(render_table(
        ["user", "seq", "event_id", "kind", "amount_micro", "balance_after_micro"],
        [(e.user_id, e.seq, e.event_id, e.kind, e.amount_micro, e.balance_after_micro)
         for e in entries],
    ))  # fmt: skip
    letters = [d for d in ops.dead_letters(settings, codec)
               if (d.record["user_id"] or "") in users]  # fmt: skip
    print()
    print(render_table(["dead letter", "reason", "detail"],
                       [(d.record["event_id"], d.record["reason"], d.record["detail"][:60])
                        for d in letters]))  # fmt: skip
    balances = {e.user_id: e.balance_after_micro for e in entries}
    ok = balances == {users[0]: 10_000_000 - 1_800 - 2_600, users[1]: 1_000_000 - 1_250_000}
    ok = ok and len(letters) == 2
    print(f"\nbalances from the ledger: {balances} ({'as expected' if ok else 'NOT as expected'})")
    return ok, users


def projections_demo(settings: Settings, codec: AvroCodec, users: list[str]) -> bool:
    """Step 3: both projectors run; the read models answer and equal a fold of the ledger."""
    import asyncio

    from projections.migrate import migrate
    from projections.queries import ReadModels
    from projections.verify import verify

    print("== 5. projections: Redis balance snapshots and Postgres read models")
    applied = migrate(settings)
    print(f"migrations: {len(applied.applied)} applied, {applied.already} already applied")
    projectors = {}
    for sink in ("redis", "postgres"):
        log_file = settings.stack.state_dir / f"demo-project-{sink}.log"
        with log_file.open("ab") as log:
            projectors[sink] = subprocess.Popen(
                [sys.executable, "-m", "creditledger.cli", "project", sink],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
    try:
        caught_up = _wait_for_projections(settings, projectors)
    finally:
        for process in projectors.values():
            process.terminate()
        for process in projectors.values():
            process.wait(timeout=60)
    if not caught_up:
        print(f"the projectors did not catch up in time; see {settings.stack.state_dir}")
        return False

    async def read() -> list[tuple[object, ...]]:
        models = ReadModels(settings)
        await models.start()
        try:
            rows: list[tuple[object, ...]] = []
            for user in users:
                snapshot = await models.redis_balance(user)
                account = await models.postgres_balance(user)
                usage = await models.consumption(user, "all")
                page = await models.history(user, limit=2)
                rows.append((user, snapshot.balance_micro, account.balance_micro, snapshot.seq,
                             usage.total.credits_micro, usage.total.calls,
                             ", ".join(f"{e.seq}:{e.kind}" for e in page.entries)
                             + (" (more)" if page.next_cursor else "")))  # fmt: skip
            return rows
        finally:
            await models.close()

    rows = asyncio.run(read())
    print(render_table(["user", "redis balance", "postgres balance", "seq", "credits used",
                        "calls", "history (newest 2)"], rows))  # fmt: skip
    report = verify(settings, codec, progress=False)
    print(f"verify: {'OK' if report.ok else 'FAILED'}: {report.entries_read} ledger entries "
          f"folded, {len(report.differences)} differences with Postgres and Redis")  # fmt: skip
    same = all(row[1] == row[2] for row in rows)
    return report.ok and same


def _wait_for_projections(settings: Settings,
                          projectors: dict[str, subprocess.Popen[bytes]]) -> bool:  # fmt: skip
    """Until each projector's stored progress reaches the ledger's current end."""
    from projections.postgres_sink import PostgresSink
    from projections.projector import Sink
    from projections.redis_sink import RedisSink
    from streams.kafka_clients import watermarks

    topic = settings.projections.ledger_topic
    ends = {p: high for p, (_low, high) in watermarks(settings, topic).items()}
    parts = sorted(ends)
    sinks: dict[str, Sink] = {"redis": RedisSink(settings), "postgres": PostgresSink(settings)}
    deadline = time.monotonic() + 300
    try:
        for sink in sinks.values():
            sink.start()
        while time.monotonic() < deadline:
            if any(p.poll() is not None for p in projectors.values()):
                return False
            behind = [name for name, sink in sinks.items()
                      if any(sink.stored(topic, parts).get(p, 0) < e
                             for p, e in ends.items() if e > 0)]  # fmt: skip
            if not behind:
                return True
            time.sleep(0.5)
        return False
    finally:
        for sink in sinks.values():
            sink.close()


def _crash_reason(log_file: Path, start: int) -> str:
    """The reason the worker's log gives, after byte ``start``, for its crash (Faust logs
    ``Crashed reason=...``)."""
    with log_file.open("rb") as log:
        log.seek(start)
        lines = log.read().decode(errors="replace").splitlines()
    reasons = [line.split("reason=", 1)[1].strip() for line in lines
               if "Crashed reason=" in line]  # fmt: skip
    if not reasons:
        return "no reason in its log"
    reason = reasons[0]  # the first crash; the rest follow from it
    if "ConsistencyError" in reason:
        reason += (" (the topics were emptied but the worker's local state was kept: "
                   "`creditledger stack down --wipe` deletes both)")  # fmt: skip
    return reason


def _wait_for_entries(settings: Settings, codec: AvroCodec, users: list[str],
                      partitions: list[int], count: int,
                      worker: subprocess.Popen[bytes]) -> list[Entry] | None:  # fmt: skip
    # A first start recovers the worker's state by folding the whole ledger:
    # seconds on a fresh stack, minutes on one that holds millions of entries.
    print(f"waiting for the worker (log: {settings.stack.state_dir / 'demo-worker.log'}) ...")
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and worker.poll() is None:
        entries = [e for _r, e in ops.read_entries(settings, codec, partitions)
                   if isinstance(e, Entry) and e.user_id in users]  # fmt: skip
        if len(entries) >= count:
            time.sleep(2)  # the dead letters of the same batch
            return sorted(entries, key=lambda e: (e.user_id, e.seq))
        time.sleep(1)
    return None
