"""Fold-state snapshots on the real stack: a worker that lost its state folder recovers from
a snapshot, a snapshot whose writer was killed halfway is not there, a corrupt one is
skipped for the one before it, and the ledger still equals the auditor."""

from __future__ import annotations

import dataclasses
import re
import shutil
import time
from collections.abc import Iterator

import psycopg
import pytest

from kernel.db import connect
from kernel.settings import Settings
from streams.codec import AvroCodec
from streams.topics import TopicsSpec
from testbed.ledger import Watcher, WorkerGroup, send
from testbed.workload import Workload, build_workload
from tests.agents.integration.test_ledger import (
    _fold_check_passes,
    _send_in_background,
    _settle_and_compare,
    _wait_for_progress,
)

SNAPSHOT_ENV = {
    # Small enough that a 20k-command workload takes several snapshots per partition.
    "CREDITLEDGER_LEDGER__SNAPSHOT_EVERY_ENTRIES": "400",
    "CREDITLEDGER_LEDGER__SNAPSHOT_KEEP": "3",
    "CREDITLEDGER_LEDGER__SNAPSHOT_CHUNK_BYTES": "65536",
    "CREDITLEDGER_LEDGER__SNAPSHOT_INTERVAL_S": "3600",
}


@pytest.fixture
def workers(stack_settings: Settings, project_topics: TopicsSpec,
            unique: str) -> Iterator[WorkerGroup]:  # fmt: skip
    group = WorkerGroup(unique, stack_settings)
    group.extra_env = dict(SNAPSHOT_ENV)
    yield group
    group.cleanup()


def _snapshots(settings: Settings, since: float) -> list[tuple[int, int, int]]:
    """(snapshot_id, partition, ledger_offset) of the snapshots taken since ``since``."""
    with connect(settings, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT snapshot_id, partition, ledger_offset FROM ledger_snapshots "
            "WHERE taken_at >= to_timestamp(%s) ORDER BY snapshot_id",
            (since,),
        ).fetchall()
    return [(int(a), int(b), int(c)) for a, b, c in rows]


def _until(condition: object, timeout_s: float, what: str, logs: WorkerGroup) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return
        time.sleep(0.2)
    raise AssertionError(f"{what} did not happen within {timeout_s} s\n{logs.tail('w1', 60)}")


def _quiet(settings: Settings, since: float, quiet_s: float) -> bool:
    """No snapshot row written in the last ``quiet_s`` and none being written."""
    with connect(settings, autocommit=True) as conn:
        row = conn.execute(
            "SELECT (SELECT coalesce(max(taken_at), to_timestamp(%s)) FROM ledger_snapshots) "
            "< now() - make_interval(secs => %s), (SELECT count(*) FROM pg_stat_activity "
            "WHERE state <> 'idle' AND query LIKE '%%ledger_snapshot%%' AND pid <> "
            "pg_backend_pid())",
            (since, quiet_s),
        ).fetchone()
    return bool(row and row[0] and row[1] == 0)


def _rest(workload: Workload, half: int) -> Workload:
    """The workload from message ``half`` on (what the sender needs of it)."""
    return dataclasses.replace(workload, messages=workload.messages[half:])


def _writer_waiting_on_lock(settings: Settings) -> bool:
    with connect(settings, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'INSERT INTO "
            "ledger_snapshots%%' AND wait_event_type = 'Lock'"
        ).fetchone()
    return bool(row and row[0])


def _flip_a_byte(settings: Settings, snapshot_id: int, previous_id: int) -> None:
    """In a file of the snapshot that the previous one does not share (files are stored
    once and shared by the snapshots that contain them)."""
    with connect(settings) as conn:
        row = conn.execute(
            "SELECT f FROM unnest((SELECT file_ids FROM ledger_snapshots WHERE snapshot_id "
            "= %s)) f WHERE f NOT IN (SELECT unnest(file_ids) FROM ledger_snapshots WHERE "
            "snapshot_id = %s) LIMIT 1",
            (snapshot_id, previous_id),
        ).fetchone()
        assert row is not None, "the newest snapshot has no file of its own"
        changed = conn.execute(
            "UPDATE ledger_snapshot_chunks SET data = set_byte(data, least(100, "
            "length(data) - 1), get_byte(data, least(100, length(data) - 1)) # 1) "
            "WHERE file_id = %s AND n = 0",
            (row[0],),
        ).rowcount
        assert changed == 1
        conn.commit()


@pytest.mark.timeout(900)
def test_a_worker_without_its_state_recovers_from_the_newest_good_snapshot(
    stack_settings: Settings, codec: AvroCodec, workers: WorkerGroup, unique: str
) -> None:
    seed = 18
    started = time.time() - 1
    workload = build_workload(codec, seed, prefix=f"s{unique}")
    target = len(workload.auditor.applied)
    watcher = Watcher(stack_settings, codec, workload)
    blocker: psycopg.Connection[object] | None = None
    half = len(workload.messages) // 2
    try:
        workers.start("w1")
        # The first half, then quiet: a snapshot that starts after the lock below is one
        # whose row must wait on it (not a prune of an earlier one, and not never, as when
        # the whole workload was folded before the lock was taken).
        delivered = send(stack_settings, workload.messages[:half], rate_per_s=1000)
        _wait_for_progress(watcher, target // 3)

        def two_of_one_partition() -> bool:
            taken = _snapshots(stack_settings, started)
            return any(sum(1 for s in taken if s[1] == p) >= 2 for _i, p, _o in taken)

        _until(two_of_one_partition, 120, "two snapshots of one partition", workers)
        _until(lambda: _quiet(stack_settings, started, 3.0), 120, "no snapshot for 3 s",
               workers)  # fmt: skip

        # SIGKILL while a snapshot is written: its chunks are in, its row waits on our lock.
        blocker = connect(stack_settings)
        blocker.execute("LOCK TABLE ledger_snapshots IN ACCESS EXCLUSIVE MODE")
        sender, rest = _send_in_background(stack_settings, _rest(workload, half), rate_per_s=1000)
        _until(lambda: _writer_waiting_on_lock(stack_settings), 120,
               "a snapshot write blocked on its row", workers)  # fmt: skip
        workers.kill("w1")
        blocker.rollback()
        blocker.close()
        blocker = None
        with connect(stack_settings, autocommit=True) as conn:
            orphans = conn.execute(
                "SELECT count(*) FROM ledger_snapshot_files f WHERE NOT EXISTS "
                "(SELECT 1 FROM ledger_snapshots s WHERE f.file_id = ANY(s.file_ids))"
            ).fetchone()
        assert orphans == (0,), "a killed snapshot write left chunks behind"

        # The newest snapshot of some partition is corrupted: one byte flipped.
        taken = _snapshots(stack_settings, started)
        partition = next(p for _i, p, _o in reversed(taken)
                         if sum(1 for s in taken if s[1] == p) >= 2)  # fmt: skip
        mine = [s for s in taken if s[1] == partition]
        corrupt, previous = mine[-1], mine[-2]
        _flip_a_byte(stack_settings, corrupt[0], previous[0])

        # The disk is lost; the worker comes back and restores every partition it can.
        shutil.rmtree(workers.root / "w1")
        workers.start("w1")
        sender.join(timeout=300)
        _settle_and_compare(workload, delivered + rest, watcher, workers, seed, ["w1"])
    finally:
        if blocker is not None:
            blocker.close()
        watcher.close()
    log = workers.log("w1").read_text(errors="replace")
    assert f"snapshot {corrupt[0]} (offset {corrupt[2]}) is not usable" in log, log[-4000:]
    assert "sha256" in log
    restored = re.findall(rf"partition {partition}: restored snapshot (\d+) \(ledger offset (\d+)",
                          log)  # fmt: skip
    assert restored, log[-4000:]
    snapshot_id, offset = map(int, restored[-1])
    assert (snapshot_id, partition, offset) == previous
    _fold_check_passes(stack_settings, codec, seed)
