"""A seeded workload of ledger commands and an independent auditor.

The auditor is a few lines of plain Python, written without the domain code,
that says what any correct ledger must contain after the workload. It relies
on one property of the workload: a duplicate (exact or conflicting) is always
sent after its original, on the same topic and partition, so Kafka delivers
it later whatever the interleaving of the two command topics; and charges are
post-paid, so balances do not depend on that interleaving either.
"""

from __future__ import annotations

import dataclasses
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from contracts.commands import Charge, Command, Grant
from contracts.records import command_to_record, command_topic
from streams.codec import AvroCodec

T0_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z


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


def _charge(rng: random.Random, event_id: str, user: str, at_ms: int) -> Charge:
    input_tokens = rng.randint(10, 8000)
    output_tokens = rng.randint(1, 2000)
    return Charge(
        event_id=event_id, user_id=user, scene=rng.choice(["chat", "search", "summary"]),
        request_id=f"req-{event_id}", conversation_id=None,
        model_alias=rng.choice(["small", "large"]), upstream_model="model-2026",
        input_tokens=input_tokens, output_tokens=output_tokens, cached_tokens=0,
        reasoning_tokens=0, usage_estimated=False, price_rule_id="rule", price_rule_version=1,
        amount_micro=input_tokens + 4 * output_tokens, occurred_at_ms=at_ms, producer="workload",
    )  # fmt: skip


def _grant(rng: random.Random, event_id: str, user: str, at_ms: int) -> Grant:
    return Grant(
        event_id=event_id, user_id=user, kind=rng.choice(["purchase", "reward", "refund"]),
        amount_micro=rng.choice([1, 5, 10, 50]) * 1_000_000, reference=f"ref-{event_id}",
        note=None, occurred_at_ms=at_ms, producer="workload",
    )  # fmt: skip


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
        at_ms = T0_MS + n
        make = _grant if rng.random() < 0.2 else _charge
        originals.append(make(rng, event_id, user, at_ms))

    # Where each extra goes: a position strictly after its original.
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
        bad = _charge(rng, f"{prefix}-bad{n}", rng.choice(user_ids), T0_MS)
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
