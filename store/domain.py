"""The credit store's rules, pure: no SQL, no HTTP, no clock of its own.

- reward periods (UTC day, ISO week, month, lifetime) and what a claim is keyed by;
- the event ids of the grants an order or a reward claim earns, derived from
  them, so a retried fulfilment or claim can never grant twice;
- the signatures of the (simulated) payment provider's callbacks, HMAC-SHA256 with a
  secret from settings (the bearer tokens are :mod:`contracts.tokens`).
"""

from __future__ import annotations

import hmac
import re
from datetime import UTC, datetime, timedelta
from typing import Literal

from contracts.fields import ID
from contracts.tokens import mac
from kernel.errors import StoreInvalid, StoreUnauthenticated

Period = Literal["day", "week", "month", "lifetime"]
RewardKind = Literal["signup", "checkin", "event"]

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
REFERENCE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:@/-]{0,199}$")


def check_user_id(user_id: str) -> str:
    """The one id rule (:data:`contracts.fields.ID`), as the proxy and the fold check it."""
    if not ID.ok(user_id):
        raise StoreInvalid("invalid_user_id", f"a user id is {ID.description}")
    return user_id


def period_start(period: Period, at: datetime) -> datetime:
    """The start of the UTC period that contains ``at`` (weeks start on Monday)."""
    at = at.astimezone(UTC)
    day = datetime(at.year, at.month, at.day, tzinfo=UTC)
    if period == "day":
        return day
    if period == "week":
        return day - timedelta(days=day.weekday())
    if period == "month":
        return datetime(at.year, at.month, 1, tzinfo=UTC)
    return EPOCH


def claim_reference(kind: RewardKind, period: Period, at: datetime,
                    event_reference: str | None) -> str:  # fmt: skip
    """What makes a claim unique for (rule, user): its period, or the triggering event.

    Sign-up and check-in claims are once per period, so the period is the reference and a
    second claim in it is the same claim. Event rewards are once per triggering event; the
    cap per period limits how many events count."""
    if kind == "event":
        if not event_reference:
            raise StoreInvalid("reference_required", "an event reward needs the triggering "
                             "event's id as 'reference'")  # fmt: skip
        if not REFERENCE.fullmatch(event_reference):
            raise StoreInvalid("invalid_reference", "a reference is 1-200 characters of "
                             "letters, digits and _ . : @ / -")  # fmt: skip
        return event_reference
    if event_reference:
        raise StoreInvalid("unexpected_reference", f"a {kind} reward is once per period "
                         "and takes no reference")  # fmt: skip
    start = period_start(period, at)
    return "lifetime" if period == "lifetime" else f"{period}:{start.date().isoformat()}"


def order_grant_event_id(order_id: str) -> str:
    return f"order:{order_id}"


def reward_grant_event_id(rule_id: str, user_id: str, reference: str) -> str:
    return f"reward:{rule_id}:{user_id}:{reference}"


def is_active(at: datetime, active_from: datetime, active_until: datetime | None) -> bool:
    return active_from <= at and (active_until is None or at < active_until)


def check_window(active_from: datetime, active_until: datetime | None) -> None:
    """A product's or a reward rule's active window: ``until`` (exclusive) after ``from``."""
    if active_until is not None and active_until <= active_from:
        raise StoreInvalid("invalid_window", "active_until must be after active_from")


def check_product(price_minor: int, original_price_minor: int) -> None:
    if price_minor > original_price_minor:
        raise StoreInvalid("invalid_product", "price_minor may not exceed "
                           "original_price_minor (a discount shows as both)")  # fmt: skip


# -- payment callbacks -----------------------------------------------------------------------

SIGNATURE = re.compile(r"[0-9a-fA-F]{64}")


def payment_message(order_id: str, payment_reference: str, amount_minor: int,
                    currency: str) -> bytes:  # fmt: skip
    return f"{order_id}|{payment_reference}|{amount_minor}|{currency}".encode()


def sign_payment(secret: bytes, order_id: str, payment_reference: str, amount_minor: int,
                 currency: str) -> str:  # fmt: skip
    """The provider's signature of a payment callback (hex HMAC-SHA256)."""
    return mac(secret, payment_message(order_id, payment_reference, amount_minor,
                                        currency)).hex()  # fmt: skip


def verify_payment(secret: bytes, signature: str, order_id: str, payment_reference: str,
                   amount_minor: int, currency: str) -> None:  # fmt: skip
    signature = signature.strip()
    if not SIGNATURE.fullmatch(signature):
        raise StoreUnauthenticated("invalid_signature", "X-Payment-Signature must be 64 hex digits "
                         "(HMAC-SHA256)")  # fmt: skip
    expected = sign_payment(secret, order_id, payment_reference, amount_minor, currency)
    if not hmac.compare_digest(expected, signature.lower()):
        raise StoreUnauthenticated("invalid_signature", "the payment callback's signature does "
                         "not match")  # fmt: skip
