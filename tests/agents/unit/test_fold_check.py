"""The ledger invariants checker, on hand-made entry sequences."""

from __future__ import annotations

import dataclasses

import pytest

from agents.fold_check import FoldChecker
from contracts.commands import Entry


def entry(user: str, seq: int, amount: int, balance: int, event_id: str | None = None) -> Entry:
    return Entry(user_id=user, seq=seq, event_id=event_id or f"{user}-{seq}",
                 command_digest=f"d-{event_id or seq}", kind="purchase" if amount > 0 else "charge",
                 amount_micro=amount, balance_after_micro=balance, occurred_at_ms=1,
                 recorded_at_ms=2)  # fmt: skip


def check(*entries: Entry, strict: bool = False) -> FoldChecker:
    checker = FoldChecker(keep_entries=strict)
    for n, e in enumerate(entries):
        checker.add(e, where=f"ledger[0]@{n}")
    return checker


def test_a_consistent_ledger_passes() -> None:
    checker = check(entry("a", 1, 100, 100), entry("b", 1, -5, -5), entry("a", 2, -30, 70))
    assert checker.ok
    assert checker.entries == 3
    assert len(checker.users) == 2


@pytest.mark.parametrize("strict", [False, True])
def test_an_identical_redelivery_is_counted_not_flagged(strict: bool) -> None:
    first = entry("a", 1, 100, 100)
    checker = check(first, entry("a", 2, -1, 99), first, strict=strict)
    assert checker.ok
    assert checker.redelivered == 1


def test_a_gap_is_the_first_violation() -> None:
    checker = check(entry("a", 1, 100, 100), entry("a", 3, -1, 99))
    assert not checker.ok
    assert checker.first_violation is not None
    assert checker.first_violation.rule == "seq_gap"
    assert "expected seq 2" in str(checker.first_violation)
    assert "ledger[0]@1" in str(checker.first_violation)


def test_a_wrong_balance_names_the_arithmetic() -> None:
    checker = check(entry("a", 1, 100, 100), entry("a", 2, -30, 60))
    assert checker.first_violation is not None
    assert checker.first_violation.rule == "balance"
    assert "previous 100 + amount -30 = 70" in checker.first_violation.detail


def test_an_event_applied_twice_is_flagged() -> None:
    checker = check(entry("a", 1, 100, 100, "ev"), entry("a", 2, 100, 200, "ev"))
    assert checker.first_violation is not None
    assert checker.first_violation.rule == "event_id_twice"


@pytest.mark.parametrize("strict", [False, True])
def test_a_fork_at_the_same_seq_is_flagged(strict: bool) -> None:
    original = entry("a", 1, 100, 100, "ev1")
    fork = dataclasses.replace(original, event_id="ev2", command_digest="other")
    checker = check(original, fork, strict=strict)
    assert checker.first_violation is not None
    assert checker.first_violation.rule == "fork"


def test_only_the_first_of_several_violations_is_kept() -> None:
    checker = check(entry("a", 2, 1, 1), entry("b", 5, 1, 1))
    assert checker.violations == 2
    assert checker.first_violation is not None
    assert checker.first_violation.user_id == "a"
