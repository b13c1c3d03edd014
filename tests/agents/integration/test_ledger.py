"""The ledger on real Kafka: a seeded workload folds to exactly what the auditor says,
even when workers are killed with SIGKILL in the middle of their work.

Reproduce a failure with CREDITLEDGER_TEST_SEED=<the seed in its message>.
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections.abc import Iterator

import pytest

from agents import ops
from kernel.settings import Settings
from streams.codec import AvroCodec
from streams.topics import TopicsSpec
from testbed.ledger import Delivered, Watcher, WorkerGroup, compare, send
from testbed.workload import Workload, build_workload

WAIT_S = 300


@pytest.fixture
def seed() -> int:
    value = int(os.environ.get("CREDITLEDGER_TEST_SEED") or random.randrange(2**32))
    print(f"workload seed: {value} (rerun with CREDITLEDGER_TEST_SEED={value})")
    return value


@pytest.fixture
def workers(stack_settings: Settings, project_topics: TopicsSpec,
            unique: str) -> Iterator[WorkerGroup]:  # fmt: skip
    group = WorkerGroup(unique, stack_settings)
    yield group
    group.cleanup()


def _bad_count(workload: Workload) -> int:
    return sum(1 for m in workload.messages if m.expect not in ("applied", "duplicate"))


def _settle_and_compare(workload: Workload, delivered: list[Delivered], watcher: Watcher,
                        workers: WorkerGroup, seed: int, names: list[str]) -> None:  # fmt: skip
    finished = watcher.wait_for(len(workload.auditor.applied), _bad_count(workload), WAIT_S)
    problems = compare(workload, delivered, watcher.observed)
    logs = "\n".join(f"--- {name} ---\n{workers.tail(name)}" for name in names)
    assert finished, (
        f"seed {seed}: not settled after {WAIT_S} s: {len(watcher.observed.entries)} of "
        f"{len(workload.auditor.applied)} entries; problems so far: {problems[:10]}\n{logs}"
    )
    assert not problems, f"seed {seed}: {len(problems)} differences: {problems[:20]}\n{logs}"


def _fold_check_passes(settings: Settings, codec: AvroCodec, seed: int) -> None:
    report = ops.fold_check(settings, codec, progress=False)
    assert report.ok, (
        f"seed {seed}: fold-check: {report.checker.first_violation} / {report.first_unreadable}"
    )


@pytest.mark.timeout(600)
def test_workload_folds_to_the_auditor(
    stack_settings: Settings, codec: AvroCodec, workers: WorkerGroup, unique: str, seed: int
) -> None:
    workload = build_workload(codec, seed, prefix=f"w{unique}")
    watcher = Watcher(stack_settings, codec, workload)
    try:
        workers.start("w1")
        delivered = send(stack_settings, workload.messages)
        _settle_and_compare(workload, delivered, watcher, workers, seed, ["w1"])
    finally:
        watcher.close()
    _fold_check_passes(stack_settings, codec, seed)


def _send_in_background(settings: Settings, workload: Workload, rate_per_s: float,
                        ) -> tuple[threading.Thread, list[Delivered]]:  # fmt: skip
    delivered: list[Delivered] = []
    thread = threading.Thread(
        target=lambda: delivered.extend(send(settings, workload.messages, rate_per_s)),
        daemon=True,
    )
    thread.start()
    return thread, delivered


def _wait_for_progress(watcher: Watcher, entries: int, timeout_s: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while len(watcher.observed.entries) < entries and time.monotonic() < deadline:
        watcher.poll(0.5)


@pytest.mark.timeout(900)
def test_sigkill_three_times_loses_nothing_and_doubles_nothing(
    stack_settings: Settings, codec: AvroCodec, workers: WorkerGroup, unique: str, seed: int
) -> None:
    workload = build_workload(codec, seed, prefix=f"k{unique}")
    rng = random.Random(seed)
    target = len(workload.auditor.applied)
    watcher = Watcher(stack_settings, codec, workload)
    try:
        workers.start("w1")
        sender, delivered = _send_in_background(stack_settings, workload, rate_per_s=2500)
        for kill in range(3):
            # Kill while it is folding: after it has written a little more, plus a random delay.
            _wait_for_progress(watcher, int(target * (kill + 1) / 5))
            time.sleep(rng.uniform(0.0, 1.5))
            assert workers.alive("w1"), f"seed {seed}: worker died by itself\n{workers.tail('w1')}"
            workers.kill("w1")
            workers.start("w1")
        sender.join(timeout=WAIT_S)
        assert workers.starts["w1"] == 4
        _settle_and_compare(workload, delivered, watcher, workers, seed, ["w1"])
    finally:
        watcher.close()
    _fold_check_passes(stack_settings, codec, seed)


@pytest.mark.timeout(900)
def test_two_workers_share_partitions_and_survive_one_killed(
    stack_settings: Settings, codec: AvroCodec, workers: WorkerGroup, unique: str, seed: int
) -> None:
    workload = build_workload(codec, seed, prefix=f"m{unique}")
    rng = random.Random(seed)
    watcher = Watcher(stack_settings, codec, workload)
    try:
        workers.start("w1")
        sender, delivered = _send_in_background(stack_settings, workload, rate_per_s=2500)
        # w2 joins while w1 is starting up or recovering: the rebalance in which
        # faust-streaming was seen to skip a message (see agents/ledger_agent.py).
        time.sleep(rng.uniform(1.0, 4.0))
        workers.start("w2")
        _wait_for_progress(watcher, len(workload.auditor.applied) // 3)
        time.sleep(rng.uniform(0.0, 1.5))
        assert workers.alive("w2"), f"seed {seed}: w2 died by itself\n{workers.tail('w2')}"
        workers.kill("w2")  # not restarted: w1 must take over its partitions
        sender.join(timeout=WAIT_S)
        _settle_and_compare(workload, delivered, watcher, workers, seed, ["w1", "w2"])
        assert workers.alive("w1"), f"seed {seed}: w1 died\n{workers.tail('w1')}"
    finally:
        watcher.close()
    _fold_check_passes(stack_settings, codec, seed)
