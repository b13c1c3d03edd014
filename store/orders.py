"""An order's life, pure: what each transition does to an order, or why it may not.

    created --pay--> paid --fulfil--> fulfilled
       |  \\--cancel--> cancelled
       \\--expire--> expired --pay--> paid   (a late payment is taken, not lost)

Each transition takes the order as loaded (under its row lock) and returns the new order,
or an outcome that says nothing changes; a refusal is a :class:`~kernel.errors.StoreError`
of its kind. The repository loads, calls one of these, and saves what comes back, so the
rules live here once, with no SQL and no HTTP.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from datetime import datetime
from typing import Any, Literal

from contracts.commands import Grant
from contracts.records import to_ms
from kernel.errors import StoreConflict, StoreNotFound
from store.domain import order_grant_event_id

OrderStatus = Literal["created", "paid", "fulfilled", "cancelled", "expired"]


@dataclass(frozen=True, slots=True)
class Order:
    order_id: str
    user_id: str
    product_id: str
    credits_micro: int
    price_minor: int  # frozen when the order was made
    currency: str
    status: OrderStatus
    payment_reference: str | None
    grant_event_id: str | None
    created_at: datetime
    expires_at: datetime
    paid_at: datetime | None
    fulfilled_at: datetime | None
    cancelled_at: datetime | None

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Order:
        return cls(**{name: row[name] for name in ORDER_FIELDS})


ORDER_FIELDS = tuple(f.name for f in fields(Order))


@dataclass(frozen=True, slots=True)
class Payment:
    """What the payment provider's callback says was paid."""

    reference: str
    amount_minor: int
    currency: str


@dataclass(frozen=True, slots=True)
class PayOutcome:
    order: Order
    newly_paid: bool  # False: the same payment was recorded before (a repeated callback)


def pay(order: Order, payment: Payment, now: datetime) -> PayOutcome:
    """Record a payment, once: the same payment again changes nothing."""
    if (order.price_minor, order.currency) != (payment.amount_minor, payment.currency):
        raise StoreConflict("amount_mismatch", f"order {order.order_id!r} costs "
                            f"{order.price_minor} {order.currency}, the payment says "
                            f"{payment.amount_minor} {payment.currency}")  # fmt: skip
    if order.status in ("paid", "fulfilled"):
        if order.payment_reference == payment.reference:
            return PayOutcome(order, newly_paid=False)
        raise StoreConflict("already_paid", f"order {order.order_id!r} was paid by another "
                            "payment; refund this one")  # fmt: skip
    if order.status == "cancelled":
        raise StoreConflict("order_cancelled", f"order {order.order_id!r} was cancelled; "
                            "refund this payment")  # fmt: skip
    paid = replace(order, status="paid", payment_reference=payment.reference, paid_at=now)
    return PayOutcome(paid, newly_paid=True)


def fulfil(order: Order, producer: str, now: datetime) -> tuple[Order, Grant]:
    """A paid order's grant and the order fulfilled; the grant's event id is the order's,
    so a second fulfilment (after a crash) can only be a duplicate in the outbox."""
    if order.status != "paid" or order.paid_at is None:
        raise StoreConflict("order_not_paid", f"order {order.order_id!r} is {order.status}; "
                            "only a paid order is fulfilled")  # fmt: skip
    event_id = order_grant_event_id(order.order_id)
    grant = Grant(event_id=event_id, user_id=order.user_id, kind="purchase",
                  amount_micro=order.credits_micro, reference=order.order_id,
                  note=f"product {order.product_id}", occurred_at_ms=to_ms(order.paid_at),
                  producer=producer)  # fmt: skip
    return replace(order, status="fulfilled", grant_event_id=event_id, fulfilled_at=now), grant


def cancel(order: Order, user_id: str, now: datetime) -> Order:
    """The owner cancels an order not paid yet."""
    if order.user_id != user_id:
        raise StoreNotFound("order_not_found", f"no order {order.order_id!r}")
    if order.status != "created":
        raise StoreConflict("order_not_cancellable", f"order {order.order_id!r} is "
                            f"{order.status}; only a created order can be cancelled")  # fmt: skip
    return replace(order, status="cancelled", cancelled_at=now)


def expire(order: Order, now: datetime) -> Order | None:
    """The order expired, or None when it is not a created order past its time."""
    if order.status != "created" or order.expires_at > now:
        return None
    return replace(order, status="expired")
