"""Seeded workloads of ledger commands, and the independent auditors of what they must give.

Used by the tests and the benchmarks alike. The auditors are a few lines of plain
Python each, written without the domain code, the projectors or ``projections.model``:

- :class:`Auditor` says what any correct ledger must contain after a
  :func:`build_workload` (it relies on one property of the workload: a duplicate,
  exact or conflicting, is always sent after its original, on the same topic and
  partition, so Kafka delivers it later whatever the interleaving of the two command
  topics; and charges are post-paid, so balances do not depend on that interleaving);
- :class:`ReadModelAuditor` says what the read models must hold after the entries of a
  :func:`build_entries` (balances, counts, totals, hourly consumption), working from the
  commands; the entries themselves come from the real fold (:class:`agents.domain.Ledger`).

:func:`random_command` is the one generator of commands; :func:`command_stream` yields
them lazily for runs too large to hold.
"""

from __future__ import annotations

import dataclasses
import random
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from agents.domain import Applied, Ledger
from contracts.commands import Charge, Command, Entry, Grant
from contracts.records import command_to_record, command_topic
from streams.codec import AvroCodec

T0_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z: entries written straight to a topic
HOUR_MS = 3_600_000
# Commands for the fold occur a day before this run (on an hour boundary): inside the
# ledger's idempotency window, as a live producer's are (older ones are `stale`).
FRESH_T0_MS = (time.time_ns() // 1_000_000 // HOUR_MS - 24) * HOUR_MS
MODELS = ("small", "large", "vision")
SCENES = ("chat", "search", "summary")


class Auditor:
    """What the ledger must hold: per user the applied event_ids, balance and count."""

    def __init__(self, max_amount_micro: int) -> None:
        self.max_amount_micro = max_amount_micro
        self.balance: dict[str, int] = {}
        self.seq: dict[str, int] = {}
        self.first: dict[str, tuple[tuple[Any, ...], str, int]] = {}
        self.applied: dict[str, tuple[str, int]] = {}  # event_id -> (user, signed amount)

    def apply(self, command: Command) -> tuple[Any, ...]:
        fields = dataclasses.asdict(command)
        fields.pop("producer")
        content = (type(command).__name__, tuple(sorted(fields.items())))
        amount = command.amount_micro
        is_charge = isinstance(command, Charge)
        if (not command.user_id or amount > self.max_amount_micro
                or (amount < 0 if is_charge else amount <= 0)):  # fmt: skip
            return ("rejected", "invalid")
        if command.event_id in self.first:
            first_content, user, seq = self.first[command.event_id]
            if first_content == content:
                return ("duplicate", user, seq)
            return ("rejected", "idempotency_conflict")
        user = command.user_id
        signed = -amount if is_charge else amount
        self.balance[user] = self.balance.get(user, 0) + signed
        self.seq[user] = self.seq.get(user, 0) + 1
        self.first[command.event_id] = (content, user, self.seq[user])
        self.applied[command.event_id] = (user, signed)
        return ("applied", user, self.seq[user], self.balance[user])


@dataclass(frozen=True)
class Message:
    topic: str
    key: bytes
    value: bytes
    expect: str  # applied | duplicate | malformed | unknown_schema | idempotency_conflict | invalid


@dataclass
class Workload:
    seed: int
    prefix: str
    messages: list[Message]
    auditor: Auditor
    expected: Counter[str] = field(default_factory=Counter)

    @property
    def users(self) -> set[str]:
        return set(self.auditor.balance)


def _extras(rng: random.Random, originals: list[Command], user_ids: list[str], prefix: str,
            duplicate_ratio: float, conflict_ratio: float, invalid: int,
            malformed: int) -> list[tuple[int, Command | bytes, str]]:  # fmt: skip
    """(position, message, expected outcome) of the extra messages, by position: each
    duplicate or conflict strictly after its original."""
    commands = len(originals)
    extras: list[tuple[int, Command | bytes, str]] = []
    for _ in range(int(commands * duplicate_ratio)):
        index = rng.randrange(commands)
        extras.append((rng.randrange(index + 1, commands + 1), originals[index], "duplicate"))
    for _ in range(int(commands * conflict_ratio)):
        index = rng.randrange(commands)
        original = originals[index]
        changed = dataclasses.replace(original, amount_micro=original.amount_micro + 1)
        extras.append((rng.randrange(index + 1, commands + 1), changed, "idempotency_conflict"))
    for n in range(invalid):
        bad = random_charge(rng, f"{prefix}-bad{n}", rng.choice(user_ids), FRESH_T0_MS)
        bad = dataclasses.replace(bad, amount_micro=-rng.randint(1, 100))
        extras.append((rng.randrange(commands + 1), bad, "invalid"))
    for n in range(malformed):
        garbage = (
            b"\x00" + rng.randbytes(rng.randint(0, 40))  # never the C3 01 marker
            if n % 2
            else b"\xc3\x01" + rng.randbytes(8) + b"\x00"  # a fingerprint nobody knows
        )
        extras.append((rng.randrange(commands + 1), garbage,
                       "malformed" if n % 2 else "unknown_schema"))  # fmt: skip
    extras.sort(key=lambda extra: extra[0])
    return extras


def build_workload(
    codec: AvroCodec,
    seed: int,
    prefix: str,
    commands: int = 20_000,
    users: int = 1_000,
    duplicate_ratio: float = 0.10,
    conflict_ratio: float = 0.01,
    malformed: int = 40,
    invalid: int = 40,
    max_amount_micro: int = 1_000_000_000_000,
) -> Workload:
    """``commands`` new commands, plus duplicates, conflicts, malformed bytes and invalid ones.

    Duplicates and conflicts repeat a command sent earlier in the list; the
    extra messages are interleaved at random positions after their original.
    """
    rng = random.Random(seed)
    user_ids = [f"{prefix}-u{n}" for n in range(users)]
    originals: list[Command] = []
    for n in range(commands):
        user = rng.choice(user_ids)
        event_id = f"{prefix}-ev{n}"
        at_ms = FRESH_T0_MS + n
        originals.append(random_command(rng, event_id, user, at_ms))

    extras = _extras(rng, originals, user_ids, prefix, duplicate_ratio, conflict_ratio,
                     invalid, malformed)  # fmt: skip

    auditor = Auditor(max_amount_micro)
    messages: list[Message] = []
    expected: Counter[str] = Counter()
    cursor = 0

    def send(item: Command | bytes, label: str | None) -> None:
        if isinstance(item, bytes):
            topic = "credit.charge.requested"
            key = rng.choice(user_ids).encode()
            messages.append(Message(topic, key, item, label or "malformed"))
            expected[label or "malformed"] += 1
            return
        outcome = auditor.apply(item)
        label = outcome[0] if outcome[0] != "rejected" else outcome[1]
        topic = command_topic(item)
        value = codec.encode(topic, command_to_record(item))
        messages.append(Message(topic, item.user_id.encode(), value, label))
        expected[label] += 1

    for position, original in enumerate(originals):
        while cursor < len(extras) and extras[cursor][0] <= position:
            send(extras[cursor][1], extras[cursor][2])
            cursor += 1
        send(original, None)
    for _, item, label in extras[cursor:]:
        send(item, label)
    return Workload(seed, prefix, messages, auditor, expected)


@dataclass
class ReadModelAuditor:
    # user -> [balance, seq, granted, charged, updated_at_ms]
    accounts: dict[str, list[int]] = field(default_factory=dict)
    # (user, hour start ms, model, scene) -> [credits, input, output, cached, reasoning, calls]
    consumption: dict[tuple[str, int, str, str], list[int]] = field(default_factory=dict)

    def apply(self, command: Command, recorded_at_ms: int) -> None:
        account = self.accounts.setdefault(command.user_id, [0, 0, 0, 0, 0])
        account[1] += 1
        account[4] = recorded_at_ms
        if isinstance(command, Charge):
            account[0] -= command.amount_micro
            account[3] += command.amount_micro
            hour = command.occurred_at_ms // HOUR_MS * HOUR_MS
            key = (command.user_id, hour, command.model_alias, command.scene)
            figures = self.consumption.setdefault(key, [0] * 6)
            for i, value in enumerate((command.amount_micro, command.input_tokens,
                                       command.output_tokens, command.cached_tokens,
                                       command.reasoning_tokens, 1)):  # fmt: skip
                figures[i] += value
        else:
            account[0] += command.amount_micro
            account[2] += command.amount_micro


@dataclass
class EntryWorkload:
    seed: int
    entries: list[Entry]
    auditor: ReadModelAuditor

    @property
    def users(self) -> set[str]:
        return set(self.auditor.accounts)


def random_charge(rng: random.Random, event_id: str, user: str, at_ms: int,
                  producer: str = "workload") -> Charge:  # fmt: skip
    input_tokens, output_tokens = rng.randint(10, 8000), rng.randint(1, 2000)
    cached, reasoning = (
        rng.choice([0, 0, rng.randint(1, 500)]),
        rng.choice([0, rng.randint(1, 900)]),
    )
    return Charge(
        event_id=event_id, user_id=user, scene=rng.choice(SCENES), request_id=f"req-{event_id}",
        conversation_id=rng.choice([None, f"conv-{rng.randint(1, 50)}"]),
        model_alias=rng.choice(MODELS), upstream_model="model-2026", input_tokens=input_tokens,
        output_tokens=output_tokens, cached_tokens=cached, reasoning_tokens=reasoning,
        usage_estimated=rng.random() < 0.05, price_rule_id="rule", price_rule_version=1,
        amount_micro=input_tokens + 4 * output_tokens + reasoning,
        occurred_at_ms=at_ms, producer=producer,
    )  # fmt: skip


def random_grant(rng: random.Random, event_id: str, user: str, at_ms: int,
                 producer: str = "workload") -> Grant:  # fmt: skip
    return Grant(
        event_id=event_id, user_id=user,
        kind=rng.choice(["purchase", "reward", "refund", "adjustment"]),
        amount_micro=rng.choice([1, 5, 10, 50]) * 1_000_000, reference=f"ref-{event_id}",
        note=None, occurred_at_ms=at_ms, producer=producer,
    )  # fmt: skip


def random_command(rng: random.Random, event_id: str, user: str, at_ms: int,
                   producer: str = "workload") -> Command:  # fmt: skip
    """One valid command: a grant one time in five, else a charge."""
    make = random_grant if rng.random() < 0.2 else random_charge
    return make(rng, event_id, user, at_ms, producer)


def command_stream(prefix: str, count: int, users: int, seed: int = 1,
                   producer: str = "workload") -> Iterator[Command]:  # fmt: skip
    """``count`` valid commands over ``users`` users, lazily (for runs too large to hold)."""
    rng = random.Random(seed)
    for n in range(count):
        yield random_command(rng, f"{prefix}-e{n}", f"{prefix}-u{rng.randrange(users)}",
                             FRESH_T0_MS + n, producer)  # fmt: skip


def build_entries(seed: int, prefix: str, commands: int, users: int,
                  span_ms: int = 40 * 24 * HOUR_MS) -> EntryWorkload:  # fmt: skip
    """``commands`` applied commands over ``users`` users, occurring across ``span_ms``."""
    rng = random.Random(seed)
    user_ids = [f"{prefix}-u{n}" for n in range(users)]
    ledger = Ledger()
    auditor = ReadModelAuditor()
    entries: list[Entry] = []
    times = sorted(T0_MS + rng.randrange(span_ms) for _ in range(commands))
    for n, at_ms in enumerate(times):
        command = random_command(
            rng, f"{prefix}-ev{n}", rng.choice(user_ids), at_ms, "projection-test"
        )
        recorded_ms = at_ms + rng.randint(1, 500)
        outcome = ledger.apply(command, recorded_ms)
        assert isinstance(outcome, Applied), outcome
        entries.append(outcome.entry)
        auditor.apply(command, recorded_ms)
    return EntryWorkload(seed, entries, auditor)
