"""The ledger state's compact values (the per-event path) and the Avro <-> domain mapping."""

from __future__ import annotations

from datetime import UTC, datetime

from agents.domain import Account, Ledger, Seen
from agents.state import pack_account, pack_seen, unpack_account, unpack_seen
from contracts.records import (
    CHARGE_TOPIC,
    LEDGER_TOPIC,
    command_from_record,
    command_to_record,
    command_topic,
    entry_from_record,
    entry_to_record,
    from_ms,
    to_ms,
)
from streams.codec import AvroCodec
from tests.agents.unit.test_domain import charge, grant


def test_account_round_trip_keeps_debt() -> None:
    assert unpack_account(pack_account(-123_456_789, 42)) == Account(-123_456_789, 42)


def test_seen_round_trip_with_unicode_user() -> None:
    seen = Seen("usér-ü", 7, "0123456789abcdef0123456789abcdef")
    assert unpack_seen(pack_seen(seen.user_id, seen.seq, seen.command_digest)) == seen


def test_milliseconds_are_exact() -> None:
    moment = datetime(2026, 3, 4, 5, 6, 7, 891000, tzinfo=UTC)
    assert from_ms(to_ms(moment)) == moment
    assert to_ms(moment) == 1772600767891


def test_commands_round_trip_through_avro(codec: AvroCodec) -> None:
    for command in (charge(), grant()):
        topic = command_topic(command)
        data = codec.encode(topic, command_to_record(command))
        assert command_from_record(topic, codec.decode(data).record) == command


def test_entries_round_trip_through_avro_unchecked(codec: AvroCodec) -> None:
    ledger = Ledger()
    for command in (grant(), charge()):
        outcome = ledger.apply(command, recorded_at_ms=1_767_225_600_123)
        entry = outcome.entry  # type: ignore[union-attr]
        data = codec.encode(LEDGER_TOPIC, entry_to_record(entry), checked=False)
        assert entry_from_record(codec.decode(data).record) == entry


def test_charge_topic_constant_matches_the_schema(codec: AvroCodec) -> None:
    assert CHARGE_TOPIC in codec.registry.event_types
