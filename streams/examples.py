"""One well-formed example of every event type.

Used by the demo's round trip, the benchmarks and the tests, so that they all
exercise the same, realistic shapes. Timestamps are fixed unless given.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

FIXED_TIME = datetime(2026, 1, 2, 3, 4, 5, 678000, tzinfo=UTC)


def example_events(
    user_id: str = "user-42", at: datetime = FIXED_TIME, suffix: str = "0001"
) -> dict[str, dict[str, Any]]:
    """A record for each event type (keyed by event type), all for ``user_id``."""
    return {
        "credit.charge.requested": {
            "event_id": f"chg-{suffix}",
            "user_id": user_id,
            "scene": "chat",
            "request_id": f"req-{suffix}",
            "conversation_id": "conv-7",
            "model_alias": "gpt-4o-mini",
            "upstream_model": "gpt-4o-mini-2024-07-18",
            "input_tokens": 1200,
            "output_tokens": 350,
            "cached_tokens": 200,
            "reasoning_tokens": 0,
            "usage_estimated": False,
            "price_rule_id": "gpt-4o-mini",
            "price_rule_version": 3,
            "amount_micro": 390,
            "occurred_at": at,
            "producer": "llm-proxy@example",
        },
        "credit.grant.requested": {
            "event_id": f"order-{suffix}",
            "user_id": user_id,
            "kind": "purchase",
            "amount_micro": 10_000_000,
            "reference": f"order-{suffix}",
            "note": None,
            "occurred_at": at,
            "producer": "credit-store@example",
        },
        "credit.ledger.entries": {
            "user_id": user_id,
            "seq": 1,
            "event_id": f"order-{suffix}",
            "command_digest": "9f2c4e1a",
            "kind": "purchase",
            "amount_micro": 10_000_000,
            "balance_after_micro": 10_000_000,
            "reference": f"order-{suffix}",
            "scene": None,
            "request_id": None,
            "conversation_id": None,
            "model_alias": None,
            "upstream_model": None,
            "input_tokens": 0,
            "output_tokens": 0,
            "cached_tokens": 0,
            "reasoning_tokens": 0,
            "usage_estimated": False,
            "price_rule_id": None,
            "price_rule_version": None,
            "occurred_at": at,
            "recorded_at": at,
        },
        "credit.commands.rejected": {
            "original_value": b"\x00not-avro",
            "original_key": user_id.encode(),
            "topic": "credit.charge.requested",
            "partition": 3,
            "offset": 1234,
            "reason": "malformed",
            "detail": "not Avro single-object encoding",
            "event_id": None,
            "user_id": user_id,
            "rejected_at": at,
            "rejected_by": "ledger-agent@example",
        },
        "plaza.events": plaza_example(user_id, at),
    }


def plaza_example(user_id: str = "user-42", at: datetime = FIXED_TIME) -> dict[str, Any]:
    """A plaza event: ``user_id`` imported author-7's plan."""
    return {
        "event_id": f"plaza:import:p_0123456789abcdef01234567:{user_id}",
        "type": "plan.imported",
        "plan_id": "p_0123456789abcdef01234567",
        "author_id": "author-7",
        "actor_id": user_id,
        "occurred_at": at,
        "producer": "plan-plaza@example",
        "title": None,
        "tags": [],
        "copy_id": "p_89abcdef0123456789abcdef",
        "comment_id": None,
        "parent_id": None,
    }
