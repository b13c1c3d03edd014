"""Reward claims, pure: who may claim what, what a claim is keyed by, and when the cap says no.

A claim is unique by (rule, user, reference): the period for sign-up and check-in
rewards, the triggering event's id for event rewards. So a claim made twice is the same
claim, and the grant's event id, derived from that key, can only be granted once. The
cap counts claims per user and period; the repository reads the counter under its row
lock, asks :func:`check_claim`, and saves.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from datetime import datetime
from typing import Any

from contracts.commands import Grant
from contracts.records import to_ms
from contracts.tokens import Principal
from kernel.errors import StoreConflict, StoreForbidden, StoreInvalid
from store.domain import (
    Period,
    RewardKind,
    claim_reference,
    is_active,
    period_start,
    reward_grant_event_id,
)


@dataclass(frozen=True, slots=True)
class RewardRule:
    rule_id: str
    kind: RewardKind
    description: str
    amount_micro: int
    cap_per_period: int
    period: Period
    trigger_event: str | None
    active_from: datetime
    active_until: datetime | None
    updated_at: datetime

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> RewardRule:
        return cls(**{name: row[name] for name in RULE_FIELDS})


RULE_FIELDS = tuple(f.name for f in fields(RewardRule))


def check_rule(kind: RewardKind, period: Period, cap_per_period: int,
               trigger_event: str | None) -> None:  # fmt: skip
    """What a reward rule must be before it is stored (the table checks the same)."""
    if (kind == "event") != (trigger_event is not None):
        raise StoreInvalid("invalid_reward_rule", "trigger_event is required for kind "
                           "'event' and only allowed there")  # fmt: skip
    if kind == "signup" and (period != "lifetime" or cap_per_period != 1):
        raise StoreInvalid("invalid_reward_rule", "a signup reward is once per lifetime: "
                           "period 'lifetime', cap_per_period 1")  # fmt: skip


def may_claim(who: Principal, kind: RewardKind, user_id: str) -> None:
    """A user claims its own sign-up and check-in rewards; a service claims event rewards
    for any user (it saw the event); an admin claims anything for anyone."""
    if who.role == "admin":
        return
    if who.role == "user":
        if user_id != who.user_id:
            raise StoreForbidden("forbidden", "a user claims rewards only for itself")
        if kind == "event":
            raise StoreForbidden("forbidden", "event rewards are claimed by the service that "
                                 "saw the event")  # fmt: skip
    elif kind != "event":
        raise StoreForbidden("forbidden", "a service token claims only event rewards; a "
                             f"{kind} reward is claimed by the user")  # fmt: skip


@dataclass(frozen=True, slots=True)
class ClaimPlan:
    """What a claim of ``rule`` by ``user_id`` at ``at`` is keyed by, and what it grants."""

    reference: str
    period_start: datetime
    grant: Grant


def plan_claim(rule: RewardRule, user_id: str, event_reference: str | None, at: datetime,
               producer: str) -> ClaimPlan:  # fmt: skip
    reference = claim_reference(rule.kind, rule.period, at, event_reference)
    grant = Grant(event_id=reward_grant_event_id(rule.rule_id, user_id, reference),
                  user_id=user_id, kind="reward", amount_micro=rule.amount_micro,
                  reference=f"{rule.rule_id}:{reference}", note=rule.description or None,
                  occurred_at_ms=to_ms(at), producer=producer)  # fmt: skip
    return ClaimPlan(reference, period_start(rule.period, at), grant)


def check_claim(rule: RewardRule, at: datetime, claimed_in_period: int) -> None:
    """A new claim (not one made before) may be granted: the rule is active at ``at`` and
    fewer than ``cap_per_period`` claims of this user were granted in ``at``'s period."""
    if not is_active(at, rule.active_from, rule.active_until):
        raise StoreConflict("reward_inactive", f"reward rule {rule.rule_id!r} is not "
                            "active now")  # fmt: skip
    if claimed_in_period >= rule.cap_per_period:
        raise StoreConflict("reward_cap_reached", f"reward {rule.rule_id!r} was claimed "
                            f"{rule.cap_per_period} time(s) this {rule.period} "
                            "already")  # fmt: skip
