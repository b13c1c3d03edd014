"""Ledger entries for projection tests, and an auditor of what the read models must hold.

The entries come from the real fold (:class:`agents.domain.Ledger`) over a
seeded list of commands. The auditor works from the *commands* with a few
lines of plain Python, sharing nothing with the projectors or with
``projections.model``: balances, counts, totals, and hourly consumption.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from agents.domain import Applied, Ledger
from contracts.commands import Charge, Command, Entry, Grant

T0_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z
HOUR_MS = 3_600_000
MODELS = ("small", "large", "vision")
SCENES = ("chat", "search", "summary")


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


def random_command(rng: random.Random, event_id: str, user: str, at_ms: int) -> Command:
    if rng.random() < 0.2:
        return Grant(
            event_id=event_id, user_id=user,
            kind=rng.choice(["purchase", "reward", "refund", "adjustment"]),
            amount_micro=rng.choice([1, 5, 10, 50]) * 1_000_000, reference=f"ref-{event_id}",
            note=None, occurred_at_ms=at_ms, producer="projection-test",
        )  # fmt: skip
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
        occurred_at_ms=at_ms, producer="projection-test",
    )  # fmt: skip


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
        command = random_command(rng, f"{prefix}-ev{n}", rng.choice(user_ids), at_ms)
        recorded_ms = at_ms + rng.randint(1, 500)
        outcome = ledger.apply(command, recorded_ms)
        assert isinstance(outcome, Applied), outcome
        entries.append(outcome.entry)
        auditor.apply(command, recorded_ms)
    return EntryWorkload(seed, entries, auditor)
