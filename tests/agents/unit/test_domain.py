"""The pure fold: rules one by one, then a stateful test against an independent auditor."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from agents.domain import (
    Account,
    Applied,
    Duplicate,
    Ledger,
    Limits,
    Rejected,
    Seen,
    command_digest,
    decide,
    evolve,
)
from contracts.commands import Charge, Command, Grant
from testbed.workload import Auditor

LIMITS = Limits(max_amount_micro=10_000_000_000)
T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z in ms


def charge(event_id: str = "c1", user_id: str = "u1", amount_micro: int = 500,
           **changes: Any) -> Charge:  # fmt: skip
    base = Charge(
        event_id=event_id, user_id=user_id, scene="chat", request_id="r1",
        conversation_id=None, model_alias="small", upstream_model="small-2026",
        input_tokens=100, output_tokens=20, cached_tokens=0, reasoning_tokens=0,
        usage_estimated=False, price_rule_id="small", price_rule_version=1,
        amount_micro=amount_micro, occurred_at_ms=T0, producer="proxy-a",
    )  # fmt: skip
    return dataclasses.replace(base, **changes)


def grant(event_id: str = "g1", user_id: str = "u1", amount_micro: int = 1_000,
          kind: str = "purchase", **changes: Any) -> Grant:  # fmt: skip
    base = Grant(event_id=event_id, user_id=user_id, kind=kind, amount_micro=amount_micro,
                 reference="order-1", note=None, occurred_at_ms=T0, producer="store")  # fmt: skip
    return dataclasses.replace(base, **changes)


def test_grant_then_charge_moves_the_balance_and_counts_seq() -> None:
    ledger = Ledger(LIMITS)
    first = ledger.apply(grant(amount_micro=1_000), recorded_at_ms=T0 + 1)
    second = ledger.apply(charge(amount_micro=300), recorded_at_ms=T0 + 2)
    assert isinstance(first, Applied)
    assert isinstance(second, Applied)
    assert (first.entry.seq, first.entry.amount_micro, first.entry.balance_after_micro) == (
        1, 1_000, 1_000)  # fmt: skip
    assert (second.entry.seq, second.entry.amount_micro, second.entry.balance_after_micro) == (
        2, -300, 700)  # fmt: skip
    assert second.entry.kind == "charge"
    assert second.entry.model_alias == "small"
    assert second.entry.recorded_at_ms == T0 + 2


def test_charges_are_post_paid_and_debt_is_recorded() -> None:
    ledger = Ledger(LIMITS)
    outcome = ledger.apply(charge(amount_micro=2_500), recorded_at_ms=T0)
    assert isinstance(outcome, Applied)
    assert outcome.entry.balance_after_micro == -2_500
    assert ledger.accounts["u1"] == Account(balance_micro=-2_500, seq=1)


def test_same_event_id_same_content_is_a_duplicate_of_the_first_entry() -> None:
    ledger = Ledger(LIMITS)
    first = ledger.apply(charge(), recorded_at_ms=T0)
    again = ledger.apply(charge(producer="proxy-b"), recorded_at_ms=T0 + 99)
    assert isinstance(first, Applied)
    assert isinstance(again, Duplicate)
    assert ledger.first_entry(again) == first.entry
    assert ledger.accounts["u1"].seq == 1


def test_same_event_id_other_content_is_a_conflict_and_not_applied() -> None:
    ledger = Ledger(LIMITS)
    ledger.apply(charge(amount_micro=500), recorded_at_ms=T0)
    conflict = ledger.apply(charge(amount_micro=501), recorded_at_ms=T0)
    assert isinstance(conflict, Rejected)
    assert conflict.reason == "idempotency_conflict"
    assert "entry 1 of user 'u1'" in conflict.detail
    assert ledger.accounts["u1"] == Account(balance_micro=-500, seq=1)


def test_event_id_reused_by_another_user_is_a_conflict() -> None:
    ledger = Ledger(LIMITS)
    ledger.apply(grant(event_id="x", user_id="u1"), recorded_at_ms=T0)
    outcome = ledger.apply(grant(event_id="x", user_id="u2"), recorded_at_ms=T0)
    assert isinstance(outcome, Rejected)
    assert outcome.reason == "idempotency_conflict"
    assert "u2" not in ledger.accounts


@pytest.mark.parametrize(
    ("command", "detail"),
    [
        (charge(user_id=""), "user_id is empty"),
        (charge(user_id="   "), "user_id is empty"),
        (charge(event_id=""), "event_id is empty"),
        (charge(amount_micro=-1), "charge amount_micro must be >= 0"),
        (grant(amount_micro=0), "grant amount_micro must be > 0"),
        (grant(amount_micro=-5), "grant amount_micro must be > 0"),
        (grant(kind="gift"), "unknown grant kind 'gift'"),
        (grant(amount_micro=10_000_000_001), "exceeds the configured maximum 10000000000"),
        (charge(amount_micro=10_000_000_001), "exceeds the configured maximum"),
        (charge(amount_micro=1.5), "amount_micro must be an integer, got float"),  # type: ignore[arg-type]
        (charge(amount_micro=True), "amount_micro must be an integer, got bool"),
        (charge(scene=""), "scene is empty"),
        (charge(price_rule_id=" "), "price_rule_id is empty"),
        (charge(price_rule_version=0), "price_rule_version must be >= 1"),
        (charge(input_tokens=-3), "input_tokens must be a non-negative integer"),
        (grant(reference=""), "reference is empty"),
        (grant(occurred_at_ms=-1), "occurred_at is missing or before 1970"),
        # Every string follows its one rule (contracts.fields): nothing a projection can't store.
        (grant(user_id="u" * 10_000), "user_id 'uuuu"),
        (grant(user_id="u\x00x"), "user_id 'u\\x00x' breaks the id rule"),
        (grant(reference="order\x00-1"), "reference 'order\\x00-1' breaks the reference rule"),
        (grant(note="line\nbreak"), "breaks the note rule"),
        (charge(scene="chat/admin"), "scene 'chat/admin' breaks the name rule"),
        (charge(upstream_model="m" * 129), "breaks the model rule"),
        (charge(request_id="r+1="), "request_id 'r+1=' breaks the id rule"),
        (charge(event_id="e" * 513), "breaks the event_id rule"),
    ],
)
def test_invalid_commands_are_rejected_precisely(command: Command, detail: str) -> None:
    ledger = Ledger(LIMITS)
    outcome = ledger.apply(command, recorded_at_ms=T0)
    assert isinstance(outcome, Rejected)
    assert outcome.reason == "invalid"
    assert detail in outcome.detail
    assert ledger.entries == {}


def test_a_zero_charge_is_recorded() -> None:
    # A call that cost nothing (free model, cached answer) still leaves a trace.
    outcome = Ledger(LIMITS).apply(charge(amount_micro=0), recorded_at_ms=T0)
    assert isinstance(outcome, Applied)
    assert outcome.entry.amount_micro == 0


def test_decide_is_deterministic() -> None:
    account = Account(balance_micro=42, seq=7)
    command = charge(amount_micro=5)
    first = decide(account, None, command, LIMITS, recorded_at_ms=T0)
    second = decide(account, None, command, LIMITS, recorded_at_ms=T0)
    assert first == second


def test_digest_ignores_the_producer_only() -> None:
    assert command_digest(charge(producer="a")) == command_digest(charge(producer="b"))
    assert command_digest(charge()) != command_digest(charge(request_id="r2"))
    assert command_digest(grant()) != command_digest(grant(note="why"))


def test_evolve_refuses_a_gap() -> None:
    entry = decide(Account(seq=1), None, grant(), LIMITS, T0)
    assert isinstance(entry, Applied)
    with pytest.raises(ValueError, match="does not follow"):
        evolve(Account(seq=5), entry.entry)


def test_evolve_refuses_an_entry_that_does_not_add_up() -> None:
    outcome = decide(Account(balance_micro=7, seq=1), None, grant(), LIMITS, T0)
    assert isinstance(outcome, Applied)
    assert evolve(Account(balance_micro=7, seq=1), outcome.entry).balance_micro == (
        7 + grant().amount_micro)  # fmt: skip
    with pytest.raises(ValueError, match="balance_after"):
        evolve(Account(balance_micro=8, seq=1), outcome.entry)  # a micro-credit from nowhere


def test_duplicate_points_at_the_seen_record() -> None:
    seen = Seen("u1", 3, command_digest(grant()))
    outcome = decide(Account(seq=9), seen, grant(), LIMITS, T0)
    assert outcome == Duplicate(seen)


# --- the stateful property: Ledger == an independent auditor (tests/workload.py) ----


def summarise(outcome: Any) -> tuple[Any, ...]:
    if isinstance(outcome, Applied):
        e = outcome.entry
        return ("applied", e.user_id, e.seq, e.balance_after_micro)
    if isinstance(outcome, Duplicate):
        return ("duplicate", outcome.first.user_id, outcome.first.seq)
    return ("rejected", outcome.reason)


USERS = st.sampled_from(["alice", "bob", "carol", ""])
AMOUNTS = st.integers(min_value=-10, max_value=12_000_000_000)


class LedgerAgreesWithAuditor(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.ledger = Ledger(LIMITS)
        self.auditor = Auditor(LIMITS.max_amount_micro)
        self.sent: list[Command] = []
        self.counter = 0
        self.clock = T0

    def _send(self, command: Command) -> None:
        self.clock += 1
        expected = self.auditor.apply(command)
        got = summarise(self.ledger.apply(command, recorded_at_ms=self.clock))
        assert got == expected, f"{command}: ledger {got} != auditor {expected}"
        self.sent.append(command)

    def _next_id(self) -> str:
        self.counter += 1
        return f"ev-{self.counter}"

    @rule(user=USERS, amount=AMOUNTS)
    def send_charge(self, user: str, amount: int) -> None:
        self._send(charge(event_id=self._next_id(), user_id=user, amount_micro=amount))

    @rule(user=USERS, amount=AMOUNTS, kind=st.sampled_from(["purchase", "reward",
                                                            "adjustment", "refund"]))  # fmt: skip
    def send_grant(self, user: str, amount: int, kind: str) -> None:
        self._send(grant(event_id=self._next_id(), user_id=user, amount_micro=amount, kind=kind))

    @rule(data=st.data())
    def resend_exact_duplicate(self, data: st.DataObject) -> None:
        if self.sent:
            self._send(data.draw(st.sampled_from(self.sent)))

    @rule(data=st.data(), delta=st.integers(min_value=1, max_value=1000))
    def resend_conflicting_duplicate(self, data: st.DataObject, delta: int) -> None:
        if self.sent:
            original = data.draw(st.sampled_from(self.sent))
            self._send(dataclasses.replace(original, amount_micro=original.amount_micro + delta))

    @invariant()
    def balances_and_seq_agree(self) -> None:
        for user, account in self.ledger.accounts.items():
            assert account.balance_micro == self.auditor.balance[user]
            assert account.seq == self.auditor.seq[user]
        assert set(self.ledger.accounts) == set(self.auditor.balance)

    @invariant()
    def seq_is_gap_free(self) -> None:
        for user, account in self.ledger.accounts.items():
            seqs = sorted(s for (u, s) in self.ledger.entries if u == user)
            assert seqs == list(range(1, account.seq + 1))


LedgerAgreesWithAuditor.TestCase.settings = hypothesis_settings(
    max_examples=200, stateful_step_count=60, deadline=None
)
TestLedgerAgreesWithAuditor = LedgerAgreesWithAuditor.TestCase


def test_a_command_older_than_the_window_is_stale_unless_the_index_knows_it() -> None:
    day = 86_400_000
    limits = dataclasses.replace(LIMITS, idempotency_window_ms=35 * day)
    first = Seen("u1", 1, command_digest(charge()))
    now = T0 + 35 * day
    at_edge = decide(Account(), None, charge(), limits, now, now_ms=now)
    assert isinstance(at_edge, Applied), "exactly 35 days old is inside the window"
    outcome = decide(Account(), None, charge(), limits, now + 1, now_ms=now + 1 + 3_600_000)
    assert isinstance(outcome, Rejected)
    assert outcome.reason == "stale"
    assert outcome.detail.startswith("occurred_at is 35 days 1 hours old")
    assert (outcome.event_id, outcome.user_id) == ("c1", "u1")
    # What the index still knows it answers for, however old: a duplicate, a conflict.
    later = now + 99 * day
    assert isinstance(decide(Account(), first, charge(), limits, later, now_ms=later), Duplicate)
    conflict = decide(Account(), first, charge(amount_micro=7), limits, later, now_ms=later)
    assert isinstance(conflict, Rejected) and conflict.reason == "idempotency_conflict"
    # A re-drive checked against the ledger passes no clock: the index decides alone.
    assert isinstance(decide(Account(), None, charge(), limits, later, now_ms=None), Applied)
    # Invalid stays invalid, whatever its age.
    invalid = decide(Account(), None, charge(amount_micro=-1), limits, now, now_ms=now * 2)
    assert isinstance(invalid, Rejected) and invalid.reason == "invalid"
