"""What the read models must hold, folded from ledger rows in plain Python (pure).

``verify`` compares this with Postgres and Redis. It shares no SQL with the
projectors, so a bug in their statements cannot hide itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from projections.entries import (
    AMOUNT,
    BALANCE,
    KIND,
    MODEL_ALIAS,
    OCCURRED_MS,
    RECORDED_MS,
    SCENE,
    SEQ,
    TOKENS,
    USER,
    Row,
)

HOUR_MS = 3_600_000


@dataclass
class AccountView:
    balance_micro: int = 0
    seq: int = 0
    granted_micro: int = 0
    charged_micro: int = 0
    updated_at_ms: int = 0


@dataclass
class EntryStats:
    count: int = 0
    amount_micro: int = 0
    tokens: int = 0


ConsumptionKey = tuple[str, int, str, str]  # user, hour start (ms), model alias, scene
# credits_micro, input, output, cached, reasoning tokens, calls
ConsumptionFigures = list[int]


@dataclass
class ReadModelFold:
    accounts: dict[str, AccountView] = field(default_factory=dict)
    entries: dict[str, EntryStats] = field(default_factory=dict)
    consumption: dict[ConsumptionKey, ConsumptionFigures] = field(default_factory=dict)

    def add(self, row: Row) -> None:
        user, seq, kind, amount = row[USER], row[SEQ], row[KIND], row[AMOUNT]
        balance_after, recorded_ms = row[BALANCE], row[RECORDED_MS]
        occurred_ms, model, scene = row[OCCURRED_MS], row[MODEL_ALIAS], row[SCENE]
        input_t, output_t, cached_t, reasoning_t = (row[i] for i in TOKENS)
        account = self.accounts.setdefault(user, AccountView())
        if seq > account.seq:
            account.seq, account.balance_micro = seq, balance_after
            account.updated_at_ms = recorded_ms
        if kind == "charge":
            account.charged_micro -= amount
            key = (user, occurred_ms - occurred_ms % HOUR_MS, model or "", scene or "")
            figures = self.consumption.setdefault(key, [0, 0, 0, 0, 0, 0])
            for i, value in enumerate((-amount, input_t, output_t, cached_t, reasoning_t, 1)):
                figures[i] += value
        else:
            account.granted_micro += amount
        stats = self.entries.setdefault(user, EntryStats())
        stats.count += 1
        stats.amount_micro += amount
        stats.tokens += input_t + output_t + cached_t + reasoning_t
