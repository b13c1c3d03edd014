"""Between Avro records (what travels) and domain objects (what the fold reasons about).

Timestamps are integer milliseconds in the domain; fastavro hands out aware
datetimes, converted here with integer arithmetic only.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from contracts.commands import ENTRY_FIELDS, Charge, Command, Entry, Grant

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


def _entry_mappers() -> tuple[Callable[[Entry], dict[str, Any]], Callable[[dict[str, Any]], Entry]]:
    """entry_to_record and entry_from_record, generated from ENTRY_FIELDS (as dataclasses
    generates __init__): as fast as written out by hand, and no field can be forgotten."""
    to_items = ", ".join(f"{f.record!r}: entry.{f.name}" for f in ENTRY_FIELDS)
    from_items = ", ".join(
        f"{f.name}=to_ms(record[{f.record!r}])" if f.time else f"{f.name}=record[{f.record!r}]"
        for f in ENTRY_FIELDS
    )
    source = (f"def entry_to_record(entry):\n    return {{{to_items}}}\n"
              f"def entry_from_record(record):\n    return Entry({from_items})\n")  # fmt: skip
    namespace: dict[str, Any] = {"Entry": Entry, "to_ms": to_ms}
    exec(compile(source, "<contracts.records: ENTRY_FIELDS>", "exec"), namespace)
    return namespace["entry_to_record"], namespace["entry_from_record"]


# fastavro writes an int as the timestamp-millis value itself: no datetime is needed on the
# way out; on the way in, older schema versions decode into datetimes (to_ms).
entry_to_record, entry_from_record = _entry_mappers()
