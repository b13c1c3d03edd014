"""Between Avro records (what travels) and domain objects (what the fold reasons about).

Timestamps are integer milliseconds in the domain; fastavro hands out aware
datetimes, converted here with integer arithmetic only.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from contracts.commands import Charge, Command, Entry, Grant

CHARGE_TOPIC = "credit.charge.requested"
GRANT_TOPIC = "credit.grant.requested"
LEDGER_TOPIC = "credit.ledger.entries"
REJECTED_TOPIC = "credit.commands.rejected"

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
ONE_MS = timedelta(milliseconds=1)


def to_ms(value: datetime | int) -> int:
    if isinstance(value, int):
        return value
    return (value - EPOCH) // ONE_MS


def from_ms(value: int) -> datetime:
    return EPOCH + value * ONE_MS


def command_from_record(event_type: str, record: dict[str, Any]) -> Command:
    if event_type == CHARGE_TOPIC:
        return Charge(
            event_id=record["event_id"], user_id=record["user_id"], scene=record["scene"],
            request_id=record["request_id"], conversation_id=record["conversation_id"],
            model_alias=record["model_alias"], upstream_model=record["upstream_model"],
            input_tokens=record["input_tokens"], output_tokens=record["output_tokens"],
            cached_tokens=record["cached_tokens"], reasoning_tokens=record["reasoning_tokens"],
            usage_estimated=record["usage_estimated"], price_rule_id=record["price_rule_id"],
            price_rule_version=record["price_rule_version"],
            amount_micro=record["amount_micro"], occurred_at_ms=to_ms(record["occurred_at"]),
            producer=record["producer"],
        )  # fmt: skip
    if event_type == GRANT_TOPIC:
        return Grant(
            event_id=record["event_id"], user_id=record["user_id"], kind=record["kind"],
            amount_micro=record["amount_micro"], reference=record["reference"],
            note=record["note"], occurred_at_ms=to_ms(record["occurred_at"]),
            producer=record["producer"],
        )  # fmt: skip
    raise ValueError(f"{event_type} is not a command topic")


def command_to_record(command: Command) -> dict[str, Any]:
    """The Avro record of a command (producers and tests use it)."""
    if isinstance(command, Charge):
        return {
            "event_id": command.event_id, "user_id": command.user_id, "scene": command.scene,
            "request_id": command.request_id, "conversation_id": command.conversation_id,
            "model_alias": command.model_alias, "upstream_model": command.upstream_model,
            "input_tokens": command.input_tokens, "output_tokens": command.output_tokens,
            "cached_tokens": command.cached_tokens, "reasoning_tokens": command.reasoning_tokens,
            "usage_estimated": command.usage_estimated, "price_rule_id": command.price_rule_id,
            "price_rule_version": command.price_rule_version,
            "amount_micro": command.amount_micro, "occurred_at": command.occurred_at_ms,
            "producer": command.producer,
        }  # fmt: skip
    return {
        "event_id": command.event_id, "user_id": command.user_id, "kind": command.kind,
        "amount_micro": command.amount_micro, "reference": command.reference,
        "note": command.note, "occurred_at": command.occurred_at_ms, "producer": command.producer,
    }  # fmt: skip


def command_topic(command: Command) -> str:
    return CHARGE_TOPIC if isinstance(command, Charge) else GRANT_TOPIC


def entry_to_record(entry: Entry) -> dict[str, Any]:
    return {
        "user_id": entry.user_id, "seq": entry.seq, "event_id": entry.event_id,
        "command_digest": entry.command_digest, "kind": entry.kind,
        "amount_micro": entry.amount_micro, "balance_after_micro": entry.balance_after_micro,
        "reference": entry.reference, "scene": entry.scene, "request_id": entry.request_id,
        "conversation_id": entry.conversation_id, "model_alias": entry.model_alias,
        "upstream_model": entry.upstream_model, "input_tokens": entry.input_tokens,
        "output_tokens": entry.output_tokens, "cached_tokens": entry.cached_tokens,
        "reasoning_tokens": entry.reasoning_tokens, "usage_estimated": entry.usage_estimated,
        "price_rule_id": entry.price_rule_id, "price_rule_version": entry.price_rule_version,
        # fastavro writes an int as the timestamp-millis value itself: no datetime needed.
        "occurred_at": entry.occurred_at_ms, "recorded_at": entry.recorded_at_ms,
    }  # fmt: skip


def entry_from_record(record: dict[str, Any]) -> Entry:
    return Entry(
        user_id=record["user_id"], seq=record["seq"], event_id=record["event_id"],
        command_digest=record["command_digest"], kind=record["kind"],
        amount_micro=record["amount_micro"], balance_after_micro=record["balance_after_micro"],
        occurred_at_ms=to_ms(record["occurred_at"]), recorded_at_ms=to_ms(record["recorded_at"]),
        reference=record["reference"], scene=record["scene"], request_id=record["request_id"],
        conversation_id=record["conversation_id"], model_alias=record["model_alias"],
        upstream_model=record["upstream_model"], input_tokens=record["input_tokens"],
        output_tokens=record["output_tokens"], cached_tokens=record["cached_tokens"],
        reasoning_tokens=record["reasoning_tokens"], usage_estimated=record["usage_estimated"],
        price_rule_id=record["price_rule_id"], price_rule_version=record["price_rule_version"],
    )  # fmt: skip
