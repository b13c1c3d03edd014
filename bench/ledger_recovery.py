"""The ledger's recovery table (``python -m bench.ledger --recovery``): a worker whose local
state is deleted comes back from a snapshot, at growing ledger sizes.

One worker folds commands over ``--accounts`` users (snapshots on, as configured) until
the ledger topic holds each of ``--sizes`` entries; at each size it is SIGKILLed, its state
folder deleted, and started again. Measured per size:

- cold start: from the new process's start to the first new entry on the ledger (a probe
  grant sent right after the start);
- what the restart read: bytes of snapshot restored, and entries folded after it;
- the snapshots: how many were written while folding up to this size, the newest ones'
  size and write time;
- the fold's throughput over the same stretch once all its commands are in Kafka (the
  producer here takes a core while it runs), snapshots being taken meanwhile.

The ledger topic's size counts every entry in it, earlier runs' too (a worker folds the
whole topic): on a fresh stack it is this run's.
"""

from __future__ import annotations

import re
import shutil
import sys
import time
import uuid
from dataclasses import dataclass
from typing import Any

from confluent_kafka import TopicPartition
from tqdm import tqdm

from bench.ledger_load import LedgerTail, commands, produce, start_group_at_end
from contracts.commands import Grant
from contracts.records import GRANT_TOPIC, LEDGER_TOPIC, command_to_record
from kernel.db import connect
from kernel.settings import Settings
from streams.codec import AvroCodec
from streams.kafka_clients import make_consumer, make_producer
from testbed.ledger import WorkerGroup
from testbed.workload import FRESH_T0_MS

TAKEN = re.compile(r"snapshot \d+ at ledger offset \d+, \d+ files, (\d+) bytes \((\d+) new\)")
RESTORED = re.compile(r"partition (\d+): restored snapshot \d+ \(ledger offset (\d+), \d+ files, "
                      r"(\d+) bytes\) in ([\d.]+) s")  # fmt: skip


@dataclass
class Step:
    size: int  # entries in the ledger topic
    fold_rate: float
    snapshots: int
    uploaded_mb: float
    snapshot_mb: float
    snapshot_s: float
    cold_s: float
    restored_mb: float
    restore_s: float
    tail: int  # entries folded after the restored offsets


def ledger_size(settings: Settings) -> tuple[int, dict[int, int]]:
    consumer = make_consumer(settings, f"bench-size-{uuid.uuid4().hex[:6]}")
    parts = consumer.list_topics(LEDGER_TOPIC, timeout=10).topics[LEDGER_TOPIC].partitions
    ends = {p: consumer.get_watermark_offsets(TopicPartition(LEDGER_TOPIC, p))[1] for p in parts}
    consumer.close()
    return sum(ends.values()), ends


def snapshot_stats(settings: Settings, log_text: str) -> tuple[int, float, float, float]:
    """Snapshots the worker logged writing (pruning keeps only the newest in Postgres), the
    MB they uploaded, and of the newest per partition: MB in all, slowest write s."""
    written = TAKEN.findall(log_text)
    uploaded = sum(int(m[1]) for m in written) / 1e6
    with connect(settings, autocommit=True) as conn:
        newest = conn.execute(
            "SELECT DISTINCT ON (partition) size_bytes, took_ms FROM ledger_snapshots "
            "WHERE topic = %s ORDER BY partition, ledger_offset DESC", (LEDGER_TOPIC,)
        ).fetchall()  # fmt: skip
    size = sum(row[0] for row in newest) / 1e6
    slowest = max((row[1] for row in newest), default=0) / 1000
    return len(written), uploaded, size, slowest


class Run:
    def __init__(self, settings: Settings, codec: AvroCodec, accounts: int) -> None:
        self.settings, self.codec, self.accounts = settings, codec, accounts
        unique = uuid.uuid4().hex[:8]
        self.prefix = f"rc{unique}"
        self.group = WorkerGroup(f"bench-{unique}", settings)
        start_group_at_end(settings, self.group.env()["CREDITLEDGER_LEDGER__APP_ID"])
        self.tail = LedgerTail(settings, codec, self.prefix)
        self.producer = make_producer(settings)
        self.sent = 0
        self.probes = 0

    def grow_to(self, size: int) -> tuple[float, int, float, float, float]:
        """Fold new commands until the ledger holds ``size`` entries: commands/s, and the
        snapshots written meanwhile (count, MB uploaded, newest MB, slowest s)."""
        have, _ends = ledger_size(self.settings)
        return self.grow(max(size - have, 0), f"to {size:,}")

    def log_size(self) -> int:
        log = self.group.log("w1")
        return log.stat().st_size if log.exists() else 0

    def grow(self, count: int, label: str) -> tuple[float, int, float, float, float]:
        log_from = self.log_size()
        items = commands(f"{self.prefix}g{self.sent}", count, self.accounts, seed=self.sent + 1)
        produce(self.settings, self.codec, items, count, f"commands {label}")
        # The fold's rate is taken once the commands are all in Kafka: while they are
        # produced, this process takes a core the worker would otherwise have.
        produced = time.monotonic()
        self.sent += count
        first = last = 0.0
        seen = at_first = 0
        deadline = time.monotonic() + 3600
        with tqdm(total=count, desc=f"fold {label}", unit="cmd", file=sys.stderr) as bar:
            while seen < count and time.monotonic() < deadline:
                if not self.group.alive("w1"):
                    raise SystemExit(f"worker died:\n{self.group.tail('w1')}")
                batch = self.tail.poll(0.2)
                if batch:
                    if not first and batch[0][0] >= produced:
                        first, at_first = batch[0][0], seen
                    last = batch[-1][0]
                    seen += len(batch)
                    bar.update(len(batch))
        if seen < count:
            raise SystemExit(f"only {seen} of {count} entries folded\n{self.group.tail('w1')}")
        rate = (count - at_first) / (last - first) if first and last > first else 0.0
        text = self.group.log("w1").read_bytes()[log_from:].decode(errors="replace")
        return (rate, *snapshot_stats(self.settings, text))

    def cold_start(self) -> tuple[float, float, float, int]:
        """SIGKILL, delete the state folder, start: seconds to the first new entry; MB and
        seconds restored; entries folded after the restored offsets."""
        self.group.kill("w1")
        shutil.rmtree(self.group.root / "w1", ignore_errors=True)
        log = self.group.log("w1")
        before = log.stat().st_size if log.exists() else 0
        _size, ends = ledger_size(self.settings)
        self.group.start("w1")
        started = time.monotonic()
        self.probes += 1
        probe = Grant(f"{self.prefix}-probe{self.probes}", f"{self.prefix}-u0", "reward", 1,
                      "probe", None, FRESH_T0_MS, "bench")  # fmt: skip
        self.producer.produce(
            GRANT_TOPIC,
            key=probe.user_id.encode(),
            value=self.codec.encode(GRANT_TOPIC, command_to_record(probe)),
        )
        self.producer.flush(10)
        while time.monotonic() - started < 1800:
            if any(e == probe.event_id.encode() for _, e in self.tail.poll(0.1)):
                cold = time.monotonic() - started
                break
        else:
            raise SystemExit(f"no entry after the cold start\n{self.group.tail('w1')}")
        text = log.read_bytes()[before:].decode(errors="replace")
        restored = {int(m[1]): (int(m[2]), int(m[3]), float(m[4])) for m in RESTORED.finditer(text)}
        tail = sum(end - 1 - restored[p][0] if p in restored else end for p, end in ends.items())
        mb = sum(r[1] for r in restored.values()) / 1e6
        seconds = sum(r[2] for r in restored.values())
        return cold, mb, seconds, tail

    def rate_without_snapshots(self, count: int) -> tuple[float, float]:
        """The fold's rate over ``count`` commands with snapshots off, then on again (the
        same worker and state, restarted between: a warm start)."""
        rates = []
        for env in ({"CREDITLEDGER_LEDGER__SNAPSHOT_EVERY_ENTRIES": "0"}, {}):
            self.group.stop_all()
            self.group.extra_env = env
            self.group.start("w1")
            rates.append(self.grow(count, "snapshots off" if env else "snapshots on")[0])
        return rates[0], rates[1]

    def close(self) -> None:
        self.producer.flush(10)
        self.tail.close()
        self.group.cleanup()


def recovery(settings: Settings, codec: AvroCodec, sizes: list[int], accounts: int,
             compare: int) -> tuple[list[Step], tuple[float, float]]:  # fmt: skip
    """The steps at each size; then the fold's rate over ``compare`` commands with
    snapshots off and on (at the last size, one after the other)."""
    run = Run(settings, codec, accounts)
    steps: list[Step] = []
    off = on = 0.0
    try:
        run.group.start("w1")
        for size in sizes:
            rate, count, uploaded, mb, took = run.grow_to(size)
            # The ledger holds at least `size` now (a probe or two more); report what it holds.
            cold, restored_mb, restore_s, tail = run.cold_start()
            steps.append(Step(ledger_size(settings)[0], rate, count, uploaded, mb, took, cold,
                              restored_mb, restore_s, tail))  # fmt: skip
        if compare:
            off, on = run.rate_without_snapshots(compare)
    finally:
        run.close()
    return steps, (off, on)


def rows(steps: list[Step], accounts: int, compare: int,
         rates: tuple[float, float]) -> list[tuple[Any, ...]]:  # fmt: skip
    table: list[tuple[Any, ...]] = [
        (f"cold start, {s.size:,} entries", f"{accounts:,} accounts",
         f"{s.cold_s:.1f} s to first entry",
         f"restored {s.restored_mb:.0f} MB in {s.restore_s:.1f} s, then folded {s.tail:,}; "
         f"{s.snapshots} snapshots ({s.uploaded_mb:.0f} MB uploaded) while folding at "
         f"{s.fold_rate:,.0f} cmds/s; newest {s.snapshot_mb:.0f} MB, slowest partition's "
         f"written in {s.snapshot_s:.1f} s")
        for s in steps
    ]  # fmt: skip
    if compare:
        off, on = rates
        table.append(
            (
                f"fold at {steps[-1].size:,} entries",
                f"{compare:,} cmds each",
                f"{on:,.0f} cmds/s snapshots on",
                f"{off:,.0f} cmds/s off, just before",
            )
        )
    return table
