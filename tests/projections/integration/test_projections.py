"""Projections on real Kafka, Postgres and Redis: equal to the auditor, crash-safe, replayable."""

from __future__ import annotations

import ast
import random
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import replace

import pytest

from contracts.redis_keys import balance_key, progress_key
from kernel.db import connect
from kernel.redis import connect_redis
from kernel.settings import Settings, load_settings, project_path
from projections.replay import Replay
from streams.codec import AvroCodec, load_codec
from testbed.topics import ScratchTopics
from testbed.workload import EntryWorkload, build_entries
from testbed.world import World


@pytest.fixture(scope="module")
def codec(stack_settings: Settings) -> AvroCodec:
    return load_codec(project_path(stack_settings.schemas.avro_dir))


@pytest.fixture
def world(stack_settings: Settings, scratch: ScratchTopics, unique: str,
          codec: AvroCodec) -> Iterator[World]:  # fmt: skip
    env = World(stack_settings, scratch, unique, codec)
    yield env
    env.cleanup()


def assert_equals_auditor(world: World, workload: EntryWorkload, seed: int) -> None:
    auditor = workload.auditor
    accounts = world.accounts()
    assert accounts == auditor.accounts, (
        f"seed {seed}: accounts differ for "
        f"{sorted(u for u in set(accounts) | set(auditor.accounts) if accounts.get(u) != auditor.accounts.get(u))[:5]}"  # noqa: E501
    )
    assert world.consumption() == auditor.consumption, f"seed {seed}: consumption differs"
    assert world.entry_count() == len(workload.entries), f"seed {seed}"
    expected_snapshots = {u: (a[0], a[1], a[4]) for u, a in auditor.accounts.items()}
    assert world.snapshots() == expected_snapshots, f"seed {seed}: Redis snapshots differ"


def test_live_projection_equals_auditor_and_redelivery_changes_nothing(
    world: World,
) -> None:
    seed = random.randrange(2**32)
    workload = build_entries(seed, world.unique, commands=6000, users=300)
    world.start_projector("postgres")
    world.start_projector("redis")
    half = len(workload.entries) // 2
    world.produce(workload.entries[:half])
    world.produce(workload.entries[half:])
    world.wait_caught_up()
    assert_equals_auditor(world, workload, seed)
    before = world.checksums()

    # The same entries again at new offsets (a producer retry without idempotence).
    world.produce(workload.entries[:1000])
    world.wait_caught_up()
    assert world.checksums() == before, f"seed {seed}: re-sent entries changed the tables"
    assert_equals_auditor(world, workload, seed)

    # Every offset delivered again: forget both progresses and restart from 0.
    world.stop_all()
    with connect(world.settings) as conn:
        conn.execute("UPDATE projection_progress SET next_offset = 0")
        conn.commit()
    client = connect_redis(world.settings)
    client.delete(progress_key(world.prefix, world.topic))
    client.close()
    world.start_projector("postgres")
    world.start_projector("redis")
    world.wait_caught_up()
    assert world.checksums() == before, f"seed {seed}: redelivery changed the tables"
    assert_equals_auditor(world, workload, seed)


def test_projectors_killed_three_times_mid_batch_still_end_equal(world: World) -> None:
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    workload = build_entries(seed, world.unique, commands=30_000, users=1_000)
    world.start_projector("postgres")
    world.start_projector("redis")
    chunks = [workload.entries[i : i + 2000] for i in range(0, len(workload.entries), 2000)]

    def send_all() -> None:
        for chunk in chunks:
            world.produce(chunk)

    producer = threading.Thread(target=send_all)
    producer.start()
    for _round in range(3):
        time.sleep(rng.uniform(0.3, 1.2))
        for sink in ("postgres", "redis"):
            world.kill(sink)
        time.sleep(rng.uniform(0.0, 0.3))
        for sink in ("postgres", "redis"):
            world.start_projector(sink)
    producer.join()
    world.wait_caught_up()
    assert_equals_auditor(world, workload, seed)
    result = world.command("verify", "--quiet")
    assert result.returncode == 0, f"seed {seed}: {result.stdout}{result.stderr}"


def test_replay_on_a_live_system_is_byte_identical_and_resumable(world: World) -> None:
    seed = random.randrange(2**32)
    workload = build_entries(seed, world.unique, commands=12_000, users=500)
    first, second = workload.entries[:8000], workload.entries[8000:]
    world.start_projector("postgres")
    world.start_projector("redis")
    world.produce(first)
    world.wait_caught_up()

    # Replay while entries keep arriving and the live projectors keep writing.
    def send_second() -> None:
        for i in range(0, len(second), 500):
            world.produce(second[i : i + 500])

    sender = threading.Thread(target=send_second)
    sender.start()
    result = world.command("replay", "--quiet")
    sender.join()
    assert result.returncode == 0, f"seed {seed}: {result.stdout}{result.stderr}"
    world.wait_caught_up()
    assert_equals_auditor(world, workload, seed)
    live = world.checksums()

    # Interrupted after three batches (in-process load, to stop at a batch), then resumed
    # (by two load processes): the same bytes again.
    settings = load_settings(**{**world.overrides, "projections": {
        **world.overrides["projections"], "replay_batch": 500, "replay_workers": 1}})  # fmt: skip
    batches = {"n": 0}

    def stop_after_three() -> bool:
        batches["n"] += 1
        return batches["n"] > 3

    interrupted = Replay(settings, world.codec, progress=False, should_stop=stop_after_three)
    report = interrupted.run()
    assert report.interrupted and 0 < report.loaded < len(workload.entries), report
    two_loaders = load_settings(**{**world.overrides, "projections": {
        **world.overrides["projections"], "replay_batch": 500, "replay_workers": 2}})  # fmt: skip
    resumed = Replay(two_loaders, world.codec, progress=False).run()
    assert resumed.resumed and not resumed.interrupted, resumed
    assert resumed.entries == len(workload.entries), resumed
    assert world.checksums() == live, f"seed {seed}: replay changed the read models"
    assert_equals_auditor(world, workload, seed)


def test_verify_passes_then_catches_a_corrupted_row_and_a_stale_snapshot(
    world: World,
) -> None:
    seed = random.randrange(2**32)
    workload = build_entries(seed, world.unique, commands=3000, users=100)
    world.start_projector("postgres")
    world.start_projector("redis")
    world.produce(workload.entries)
    world.wait_caught_up()
    world.stop_all()
    ok = world.command("verify", "--quiet")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "verify: OK" in ok.stdout

    users = sorted(u for u, a in workload.auditor.accounts.items() if a[1] >= 3)
    corrupted, stale, lost = users[0], users[1], users[2]
    with connect(world.settings) as conn:
        conn.execute("UPDATE accounts SET balance_micro = balance_micro + 1 WHERE user_id = %s",
                     (corrupted,))  # fmt: skip
        conn.execute("DELETE FROM consumption_hourly WHERE user_id = %s", (lost,))
        conn.commit()
    balance, seq, _updated = world.snapshots()[stale]
    client = connect_redis(world.settings)
    client.hset(balance_key(world.prefix, stale), mapping={"seq": seq - 1})
    client.close()

    bad = world.command("verify", "--quiet")
    assert bad.returncode == 1, bad.stdout + bad.stderr
    lines = bad.stdout.splitlines()
    assert any(corrupted in line and "balance_micro" in line and "postgres" in line
               for line in lines), bad.stdout  # fmt: skip
    assert any(stale in line and "stale" in line and "redis" in line for line in lines), bad.stdout
    assert any(lost in line and "consumption_hourly" in line for line in lines), bad.stdout
    assert "verify: FAILED" in bad.stdout

    # Replay repairs both stores.
    repaired = world.command("replay", "--quiet")
    assert repaired.returncode == 0, repaired.stdout + repaired.stderr
    again = world.command("verify", "--quiet")
    assert again.returncode == 0, again.stdout + again.stderr
    assert balance == world.snapshots()[stale][0]


def test_an_entry_no_read_model_can_store_is_quarantined_and_the_rest_goes_on(
    world: World,
) -> None:
    """Entries folded before the field rules (or by a buggy producer of the ledger topic):
    a 10 KB user id, a NUL in a user id, a normal user with a NUL in a reference. Each is
    quarantined with its reason; everybody else's entries keep flowing; verify and replay
    say so instead of passing or dying."""
    seed = random.randrange(2**32)
    workload = build_entries(seed, world.unique, commands=2000, users=50)
    victim = sorted(workload.users)[0]
    last = max((e for e in workload.entries if e.user_id == victim), key=lambda e: e.seq)
    template = replace(last, kind="purchase", amount_micro=5, scene=None, model_alias=None,
                       upstream_model=None, price_rule_id=None, price_rule_version=None,
                       input_tokens=0, output_tokens=0, cached_tokens=0, reasoning_tokens=0,
                       usage_estimated=False, request_id=None, conversation_id=None)  # fmt: skip
    bad = [
        replace(template, user_id="u" * 10_000, seq=1, event_id="bad-long", reference="r"),
        replace(template, user_id="nul\x00user", seq=1, event_id="bad-nul", reference="r"),
        replace(template, seq=last.seq + 1, event_id="bad-ref", reference="order\x00-1",
                balance_after_micro=last.balance_after_micro + 5),
    ]  # fmt: skip
    half = len(workload.entries) // 2
    world.start_projector("postgres")
    world.start_projector("redis")
    world.produce(workload.entries[:half] + bad + workload.entries[half:])
    world.wait_caught_up()  # nobody is stuck behind the bad entries
    assert_equals_auditor(world, workload, seed)
    with connect(world.settings) as conn:
        rows = conn.execute("SELECT event_id, reason FROM quarantined_entries "
                            "ORDER BY event_id").fetchall()  # fmt: skip
    assert [r[0] for r in rows] == ["bad-long", "bad-nul", "bad-ref"], rows
    assert "breaks the id rule" in rows[0][1] and "breaks the reference rule" in rows[2][1]
    world.stop_all()

    report = world.command("verify", "--quiet")
    assert report.returncode == 1, report.stdout + report.stderr
    assert report.stdout.count("quarantined") >= 3, report.stdout
    replayed = world.command("replay", "--quiet")
    assert replayed.returncode == 0, replayed.stdout + replayed.stderr
    assert_equals_auditor(world, workload, seed)


def test_verify_fails_on_a_stalled_projector(world: World) -> None:
    seed = random.randrange(2**32)
    workload = build_entries(seed, world.unique, commands=500, users=20)
    world.start_projector("postgres")
    world.start_projector("redis")
    world.produce(workload.entries[:250])
    world.wait_caught_up()
    world.kill("postgres")  # dead: the entries after it are never applied
    world.produce(workload.entries[250:])
    world.wait_caught_up(sinks=("redis",))
    result = world.command("verify", "--quiet", "--max-lag-s", "3")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "stalled 3 s" in result.stdout and "postgres" in result.stdout, result.stdout
    stalled = [line for line in result.stdout.splitlines() if "stalled" in line]
    assert stalled and all("postgres" in line for line in stalled), result.stdout
    running = world.command("verify", "--quiet", "--redis-only", "--expect-running")
    assert running.returncode == 0, running.stdout + running.stderr
    world.stop_all()  # a clean stop leaves the group at once
    stopped = world.command("verify", "--quiet", "--redis-only", "--expect-running")
    assert stopped.returncode == 1, stopped.stdout + stopped.stderr
    assert "a running projector" in stopped.stdout


def test_a_redis_that_comes_back_empty_is_refilled_from_postgres(world: World) -> None:
    """Redis loses every key of the world (as a restart without persistence would) while
    entries keep coming: the Redis projector refills the snapshots from Postgres and reads
    the ledger only from the Postgres progress on, and ends equal to the auditor."""
    seed = random.randrange(2**32)
    workload = build_entries(seed, world.unique, commands=20_000, users=800)
    half = len(workload.entries) // 2
    world.start_projector("postgres")
    world.start_projector("redis")
    world.produce(workload.entries[:half])
    world.wait_caught_up()
    rest = workload.entries[half:]
    chunks = [rest[i : i + 1000] for i in range(0, len(rest), 1000)]

    def send_rest() -> None:
        for chunk in chunks:
            world.produce(chunk)

    producer = threading.Thread(target=send_rest)
    producer.start()
    client = connect_redis(world.settings)
    keys = list(client.scan_iter(match=f"{world.prefix}:*", count=1000))
    assert progress_key(world.prefix, world.topic).encode() in keys
    client.delete(*keys)  # one command: Redis is empty for this world at one instant
    client.close()
    producer.join()
    world.wait_caught_up()
    assert_equals_auditor(world, workload, seed)
    result = world.command("verify", "--quiet")
    assert result.returncode == 0, f"seed {seed}: {result.stdout}{result.stderr}"
    found = re.findall(r"refilled (\d+) snapshots from Postgres and going on from (\{[^}]*\})",
                       world.log_tail("redis", 100_000))  # fmt: skip
    assert found, f"seed {seed}: no refill in the Redis projector's log"
    snapshots, going_on = int(found[-1][0]), ast.literal_eval(found[-1][1])
    # Postgres had every entry of the first half when Redis emptied: the projector went on
    # from there, not from offset 0, and so read none of those entries again.
    assert sum(going_on.values()) >= half, (seed, going_on)
    assert snapshots >= len({entry.user_id for entry in workload.entries[:half]}), seed
