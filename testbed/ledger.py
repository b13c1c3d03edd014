"""Ledger workers as real processes, a workload sent to them, and what they wrote.

Each user of a :class:`WorkerGroup` gets its own Faust app id (its own consumer group)
and its own state folders. The topics are the real ones; a :class:`Watcher` keeps only
the users and keys of its own workload, and :func:`compare` holds that against the
workload's auditor.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from confluent_kafka import TopicPartition

from contracts.commands import Entry
from contracts.records import LEDGER_TOPIC, REJECTED_TOPIC, entry_from_record
from kernel.settings import Settings
from stack.processes import ProcessGroup
from streams.codec import AvroCodec
from streams.kafka_clients import make_consumer, make_producer
from testbed.workload import Message, Workload
from testbed.world import NO_METRICS_PORTS, kafka_env

CLI = (sys.executable, "-m", "creditledger.cli")


class WorkerGroup:
    """Ledger worker processes sharing one consumer group (its own app id and state
    folders, so tests never share a worker's state); the topics are the real ones."""

    def __init__(self, unique: str, settings: Settings) -> None:
        self.extra_env: dict[str, str] = {}
        self.unique = unique
        self.root = Path(f"/tmp/creditledger-test-{unique}")
        self.settings = settings
        self.parts = ProcessGroup(self.root)
        self.starts: dict[str, int] = {}

    @property
    def processes(self) -> dict[str, subprocess.Popen[bytes]]:
        return self.parts.processes

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            {
                "CREDITLEDGER_LEDGER__APP_ID": f"test-ledger-{self.unique}",
                "CREDITLEDGER_LEDGER__DATA_DIR": str(self.root),
                **kafka_env(self.settings),
                **NO_METRICS_PORTS,
            }
        )
        env.update(self.extra_env)
        return env

    def log(self, name: str) -> Path:
        return self.parts.log(name)

    def start(self, name: str, *, supervised: bool = False) -> None:
        """Start a worker; unsupervised (the fold itself) unless ``supervised``, so that a
        fold that dies by itself shows as a dead process."""
        self.starts[name] = self.starts.get(name, 0) + 1
        mode = [] if supervised else ["--no-supervise"]
        self.parts.start(name, [*CLI, "worker", "--name", name, "--loglevel", "info", *mode],
                         env=self.env())  # fmt: skip

    def kill(self, name: str) -> None:
        """SIGKILL: no shutdown hook, no final commit, no flush."""
        self.parts.kill(name)

    def alive(self, name: str) -> bool:
        return self.parts.alive(name)

    def stop_all(self) -> None:
        self.parts.stop_all()

    def tail(self, name: str, lines: int = 30) -> str:
        return self.parts.tail(name, lines)

    def cleanup(self) -> None:
        self.stop_all()
        shutil.rmtree(self.root, ignore_errors=True)


@dataclass
class Delivered:
    message: Message
    partition: int
    offset: int


def send(settings: Settings, messages: Iterable[Message], rate_per_s: float | None = None,
         ) -> list[Delivered]:  # fmt: skip
    """Produce the messages in order (optionally paced); return where each one landed."""
    producer = make_producer(settings)
    delivered: list[Delivered] = []
    errors: list[object] = []

    def report(message: Message) -> Callable[[Any, Any], None]:
        def on_delivery(err: Any, msg: Any) -> None:
            if err is not None:
                errors.append(err)
            else:
                delivered.append(Delivered(message, msg.partition(), msg.offset()))

        return on_delivery

    started = time.monotonic()
    for count, message in enumerate(messages, start=1):
        producer.produce(message.topic, key=message.key, value=message.value,
                         on_delivery=report(message))  # fmt: skip
        producer.poll(0)
        if rate_per_s is not None:
            ahead = count / rate_per_s - (time.monotonic() - started)
            if ahead > 0:
                time.sleep(ahead)
    assert producer.flush(60) == 0, "workload not fully delivered"
    assert not errors, errors[:3]
    return delivered


@dataclass
class Observed:
    entries: dict[tuple[str, int], list[Entry]] = field(default_factory=dict)
    dead_letters: dict[tuple[str, int, int], set[str]] = field(default_factory=dict)


class Watcher:
    """Reads the ledger and the DLQ incrementally, keeping what belongs to one workload."""

    def __init__(self, settings: Settings, codec: AvroCodec, workload: Workload) -> None:
        self.codec = codec
        self.users = workload.users
        self.keys = {m.key for m in workload.messages}
        self.observed = Observed()
        self.consumer = make_consumer(settings, f"test-watch-{workload.prefix}",
                                      **{"fetch.wait.max.ms": 50})  # fmt: skip
        assignment = []
        for topic in (LEDGER_TOPIC, REJECTED_TOPIC):
            partitions = self.consumer.list_topics(topic, timeout=10).topics[topic].partitions
            assignment += [TopicPartition(topic, p, 0) for p in partitions]
        self.consumer.assign(assignment)

    def poll(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            batch = self.consumer.consume(num_messages=5000, timeout=0.2)
            if not batch:
                return
            for message in batch:
                if message.error():
                    continue
                if message.topic() == LEDGER_TOPIC:
                    self._entry(message.value())
                else:
                    self._dead_letter(message.value())

    def _entry(self, value: bytes | None) -> None:
        entry = entry_from_record(self.codec.decode(value, expected=LEDGER_TOPIC).record)
        if entry.user_id in self.users:
            self.observed.entries.setdefault((entry.user_id, entry.seq), []).append(entry)

    def _dead_letter(self, value: bytes | None) -> None:
        record = self.codec.decode(value, expected=REJECTED_TOPIC).record
        if record["original_key"] in self.keys:
            where = (record["topic"], record["partition"], record["offset"])
            self.observed.dead_letters.setdefault(where, set()).add(record["reason"])

    def wait_for(self, entries: int, dead_letters: int, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.poll(2.0)
            if (len(self.observed.entries) >= entries
                    and len(self.observed.dead_letters) >= dead_letters):  # fmt: skip
                self.poll(1.0)  # anything still in flight, e.g. a wrong extra entry
                return True
        return False

    def close(self) -> None:
        self.consumer.close()


def compare(workload: Workload, delivered: list[Delivered], observed: Observed) -> list[str]:
    """Every difference between what the workers wrote and what the auditor expects."""
    problems: list[str] = []
    auditor = workload.auditor
    by_event: dict[str, Entry] = {}
    for (user, seq), copies in observed.entries.items():
        first = copies[0]
        for other in copies[1:]:
            if other != first:
                problems.append(f"({user}, {seq}) written twice with different content")
        if first.event_id in by_event:
            problems.append(f"event {first.event_id} applied twice: seq "
                            f"{by_event[first.event_id].seq} and {seq}")  # fmt: skip
        by_event[first.event_id] = first
    for event_id, (user, signed) in auditor.applied.items():
        entry = by_event.get(event_id)
        if entry is None:
            problems.append(f"lost: {event_id} ({user}, {signed})")
        elif (entry.user_id, entry.amount_micro) != (user, signed):
            problems.append(f"{event_id}: ledger has ({entry.user_id}, {entry.amount_micro}), "
                            f"auditor ({user}, {signed})")  # fmt: skip
    for event_id in set(by_event) - set(auditor.applied):
        problems.append(f"applied but should not be: {event_id}")
    for user, balance in auditor.balance.items():
        count = auditor.seq[user]
        last = observed.entries.get((user, count))
        if last is None:
            problems.append(f"{user}: no entry at seq {count}")
        elif last[0].balance_after_micro != balance:
            problems.append(f"{user}: balance {last[0].balance_after_micro} != auditor {balance}")
        if (user, count + 1) in observed.entries:
            problems.append(f"{user}: entries beyond seq {count}")
        for seq in range(1, count + 1):
            if (user, seq) not in observed.entries:
                problems.append(f"{user}: seq {seq} missing")
                break
    expected_dlq = {
        (d.message.topic, d.partition, d.offset): d.message.expect
        for d in delivered
        if d.message.expect not in ("applied", "duplicate")
    }
    for where, reason in expected_dlq.items():
        found = observed.dead_letters.get(where)
        if found is None:
            problems.append(f"dead letter missing for {where} ({reason})")
        elif found != {reason}:
            problems.append(f"dead letter {where}: reasons {sorted(found)}, expected {reason}")
    for where in set(observed.dead_letters) - set(expected_dlq):
        problems.append(f"unexpected dead letter {where}: {sorted(observed.dead_letters[where])}")
    return problems
