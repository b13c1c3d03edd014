"""The credit store's pure rules: periods, claim references, tokens, payment signatures."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from contracts.tokens import sign_token, verify_token
from kernel.errors import Refused, Unauthenticated
from store.domain import claim_reference, is_active, period_start, sign_payment, verify_payment

SECRET = b"unit-secret"


def at(*parts: int) -> datetime:
    return datetime(*parts, tzinfo=UTC)  # type: ignore[arg-type, misc]


def test_periods_start_on_utc_boundaries() -> None:
    moment = at(2026, 11, 29, 23, 59, 59, 999999)  # a Sunday
    assert period_start("day", moment) == at(2026, 11, 29)
    assert period_start("week", moment) == at(2026, 11, 23)  # Monday
    assert period_start("week", at(2026, 11, 30)) == at(2026, 11, 30)
    assert period_start("month", moment) == at(2026, 11, 1)
    assert period_start("lifetime", moment) == at(1970, 1, 1)


def test_claim_references_are_the_period_or_the_event() -> None:
    assert claim_reference("checkin", "day", at(2026, 1, 2, 3), None) == "day:2026-01-02"
    assert claim_reference("signup", "lifetime", at(2026, 1, 2), None) == "lifetime"
    assert claim_reference("event", "day", at(2026, 1, 2), "forum-evt-9") == "forum-evt-9"
    for kind, ref, code in [("event", None, "reference_required"),
                            ("event", "bad ref", "invalid_reference"),
                            ("checkin", "x", "unexpected_reference")]:  # fmt: skip
        with pytest.raises(Refused) as caught:
            claim_reference(kind, "day", at(2026, 1, 2), ref)  # type: ignore[arg-type]
        assert caught.value.code == code


def test_active_windows_include_the_start_and_exclude_the_end() -> None:
    start, end = at(2026, 1, 1), at(2026, 2, 1)
    assert is_active(start, start, end)
    assert not is_active(end, start, end)
    assert is_active(end, start, None)


def test_tokens_round_trip_and_refuse_tampering_and_expiry() -> None:
    token = sign_token(SECRET, "u-1", "admin", 2000)
    principal = verify_token(SECRET, token, 1999)
    assert (principal.user_id, principal.role, principal.expires_at) == ("u-1", "admin", 2000)
    payload, mac = token.split(".")
    forged = sign_token(SECRET, "u-2", "admin", 2000).split(".")[0] + "." + mac
    cases = {forged: "invalid_token", token: "token_expired", "nodot": "invalid_token",
             payload + ".!!": "invalid_token"}  # fmt: skip
    for bad, code in cases.items():
        with pytest.raises(Refused) as caught:
            verify_token(SECRET, bad, 2000)
        assert (type(caught.value), caught.value.code) == (Unauthenticated, code)
    with pytest.raises(Refused):
        verify_token(b"other-secret", token, 1999)


def test_payment_signatures_cover_every_field() -> None:
    signature = sign_payment(SECRET, "o_1", "pay-1", 500, "USD")
    verify_payment(SECRET, signature, "o_1", "pay-1", 500, "USD")
    verify_payment(SECRET, signature.upper(), "o_1", "pay-1", 500, "USD")
    for changed in [("o_2", "pay-1", 500, "USD"), ("o_1", "pay-2", 500, "USD"),
                    ("o_1", "pay-1", 501, "USD"), ("o_1", "pay-1", 500, "EUR")]:  # fmt: skip
        with pytest.raises(Refused):
            verify_payment(SECRET, signature, *changed)
