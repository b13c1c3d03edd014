"""The credit store's pure core: an order's transitions and the reward-claim decision.

No database: the repository loads an order under its row lock, calls one transition and
saves what comes back, so these are the rules themselves."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from contracts.tokens import Principal
from kernel.errors import StoreConflict, StoreError, StoreForbidden, StoreNotFound
from store import orders as transition
from store.orders import Order, Payment
from store.rewards import RewardRule, check_claim, check_rule, may_claim, plan_claim

T0 = datetime(2026, 3, 1, 12, tzinfo=UTC)
PAYMENT = Payment("pay-1", 499, "EUR")


def created(**changes: object) -> Order:
    fields: dict[str, object] = {
        "order_id": "o_1", "user_id": "alice", "product_id": "starter",
        "credits_micro": 5_000_000, "price_minor": 499, "currency": "EUR", "status": "created",
        "payment_reference": None, "grant_event_id": None, "created_at": T0,
        "expires_at": T0 + timedelta(minutes=30), "paid_at": None, "fulfilled_at": None,
        "cancelled_at": None, **changes,
    }  # fmt: skip
    return Order.from_row(fields)


def test_pay_then_fulfil_grants_the_pack_once_under_the_orders_event_id() -> None:
    outcome = transition.pay(created(), PAYMENT, T0)
    assert outcome.newly_paid and outcome.order.status == "paid"
    assert (outcome.order.payment_reference, outcome.order.paid_at) == ("pay-1", T0)
    again = transition.pay(outcome.order, PAYMENT, T0 + timedelta(seconds=5))
    assert not again.newly_paid and again.order == outcome.order  # a repeated callback
    fulfilled, grant = transition.fulfil(outcome.order, "credit-store", T0)
    assert fulfilled.status == "fulfilled" and fulfilled.grant_event_id == "order:o_1"
    assert (grant.event_id, grant.user_id, grant.kind) == ("order:o_1", "alice", "purchase")
    assert grant.amount_micro == 5_000_000 and grant.reference == "o_1"
    with pytest.raises(StoreConflict) as caught:
        transition.fulfil(fulfilled, "credit-store", T0)
    assert caught.value.code == "order_not_paid"
    # Paid by the same payment once fulfilled: still the same callback, nothing changes.
    assert not transition.pay(fulfilled, PAYMENT, T0).newly_paid


@pytest.mark.parametrize(("order", "payment", "code"), [
    (created(), Payment("pay-1", 498, "EUR"), "amount_mismatch"),
    (created(), Payment("pay-1", 499, "USD"), "amount_mismatch"),
    (created(status="paid", payment_reference="pay-0", paid_at=T0), PAYMENT, "already_paid"),
    (created(status="fulfilled", payment_reference="pay-0", paid_at=T0,
             grant_event_id="order:o_1"), PAYMENT, "already_paid"),
    (created(status="cancelled", cancelled_at=T0), PAYMENT, "order_cancelled"),
])  # fmt: skip
def test_payments_that_must_be_refunded_are_refused(order: Order, payment: Payment,
                                                    code: str) -> None:  # fmt: skip
    with pytest.raises(StoreConflict) as caught:
        transition.pay(order, payment, T0)
    assert caught.value.code == code


def test_a_late_payment_of_an_expired_order_is_taken_not_lost() -> None:
    expired = transition.expire(created(), T0 + timedelta(hours=1))
    assert expired is not None and expired.status == "expired"
    assert transition.pay(expired, PAYMENT, T0 + timedelta(hours=2)).order.status == "paid"


def test_expire_and_cancel_apply_only_to_created_orders() -> None:
    order = created()
    assert transition.expire(order, order.expires_at - timedelta(microseconds=1)) is None
    assert transition.expire(order, order.expires_at) is not None
    paid = transition.pay(order, PAYMENT, T0).order
    assert transition.expire(paid, T0 + timedelta(days=1)) is None
    cancelled = transition.cancel(order, "alice", T0)
    assert (cancelled.status, cancelled.cancelled_at) == ("cancelled", T0)
    with pytest.raises(StoreNotFound):
        transition.cancel(order, "mallory", T0)  # not hers: as if it did not exist
    for other in (paid, cancelled):
        with pytest.raises(StoreConflict) as caught:
            transition.cancel(other, "alice", T0)
        assert caught.value.code == "order_not_cancellable"


STEPS = st.lists(st.sampled_from(["pay", "pay-other", "fulfil", "cancel", "expire"]),
                 max_size=12)  # fmt: skip


@given(STEPS)
def test_no_sequence_of_transitions_grants_twice_or_grants_unpaid(steps: list[str]) -> None:
    order, grants = created(), []
    for step in steps:
        try:
            if step in ("pay", "pay-other"):
                payment = PAYMENT if step == "pay" else Payment("pay-2", 499, "EUR")
                order = transition.pay(order, payment, T0).order
            elif step == "fulfil":
                order, grant = transition.fulfil(order, "credit-store", T0)
                grants.append(grant)
            elif step == "cancel":
                order = transition.cancel(order, "alice", T0)
            else:
                order = transition.expire(order, T0 + timedelta(days=1)) or order
        except StoreError:
            pass
    assert len(grants) <= 1
    assert (order.status == "fulfilled") == (len(grants) == 1)
    if order.status in ("paid", "fulfilled"):
        assert order.payment_reference is not None and order.paid_at is not None


def rule(**changes: object) -> RewardRule:
    fields: dict[str, object] = {
        "rule_id": "daily", "kind": "checkin", "description": "Daily check-in",
        "amount_micro": 100_000, "cap_per_period": 2, "period": "day", "trigger_event": None,
        "active_from": T0, "active_until": T0 + timedelta(days=30), "updated_at": T0,
        **changes,
    }  # fmt: skip
    return RewardRule.from_row(fields)


def test_a_claim_is_keyed_by_its_period_and_grants_under_that_key() -> None:
    plan = plan_claim(rule(), "bob", None, T0 + timedelta(hours=3), "credit-store")
    assert plan.reference == "day:2026-03-01"
    assert plan.period_start == datetime(2026, 3, 1, tzinfo=UTC)
    assert plan.grant.event_id == "reward:daily:bob:day:2026-03-01"
    assert (plan.grant.kind, plan.grant.amount_micro) == ("reward", 100_000)
    event = plan_claim(rule(kind="event", trigger_event="forum.x"), "bob", "evt-7", T0, "s")
    assert event.grant.event_id == "reward:daily:bob:evt-7"


def test_the_cap_and_the_active_window_decide_a_new_claim() -> None:
    check_claim(rule(), T0, 0)
    check_claim(rule(), T0, 1)
    for at, claimed, code in [(T0, 2, "reward_cap_reached"), (T0, 9, "reward_cap_reached"),
                              (T0 - timedelta(microseconds=1), 0, "reward_inactive"),
                              (T0 + timedelta(days=30), 0, "reward_inactive")]:  # fmt: skip
        with pytest.raises(StoreConflict) as caught:
            check_claim(rule(), at, claimed)
        assert caught.value.code == code


def test_who_may_claim_what() -> None:
    user, service = Principal("bob", "user", 0), Principal("forum", "service", 0)
    admin = Principal("root", "admin", 0)
    may_claim(user, "checkin", "bob")
    may_claim(service, "event", "bob")
    for who, kind, for_user in [(admin, "checkin", "bob"), (admin, "event", "carol")]:
        may_claim(who, kind, for_user)  # type: ignore[arg-type]
    refused = [(user, "checkin", "carol"), (user, "event", "bob"), (service, "signup", "bob"),
               (service, "checkin", "bob")]  # fmt: skip
    for who, kind, for_user in refused:
        with pytest.raises(StoreForbidden):
            may_claim(who, kind, for_user)  # type: ignore[arg-type]


def test_reward_rules_are_checked_before_they_are_stored() -> None:
    check_rule("event", "day", 5, "forum.plan_imported")
    check_rule("signup", "lifetime", 1, None)
    for args in [("event", "day", 5, None), ("checkin", "day", 1, "x"),
                 ("signup", "day", 1, None), ("signup", "lifetime", 2, None)]:  # fmt: skip
        with pytest.raises(StoreError) as caught:
            check_rule(*args)  # type: ignore[arg-type]
        assert caught.value.code == "invalid_reward_rule"
