"""The entry's one definition (contracts.commands.ENTRY_FIELDS) against what derives from it
and what it must agree with: the Avro schema, the Entry type, the projections' rows."""

from __future__ import annotations

import json
from dataclasses import fields

from hypothesis import given
from hypothesis import strategies as st

from contracts.commands import ENTRY_FIELDS, Entry
from contracts.records import entry_from_record, entry_to_record
from kernel.settings import PROJECT_ROOT
from projections.entries import RAW_COLUMNS, RULED_COLUMNS
from projections.postgres_sink import ENTRY_COLUMNS, RAW_COLUMN_TYPES
from streams.codec import load_codec

SCHEMAS = PROJECT_ROOT / "schemas" / "avro"


def test_entry_fields_are_the_avro_record_and_the_entry_type() -> None:
    schema = json.loads((SCHEMAS / "credit.ledger.entries.avsc").read_text())
    assert [f.record for f in ENTRY_FIELDS] == [f["name"] for f in schema["fields"]]
    assert {f.name for f in ENTRY_FIELDS} == {f.name for f in fields(Entry)}
    millis = {"type": "long", "logicalType": "timestamp-millis"}
    times = {f["name"] for f in schema["fields"] if f["type"] == millis}
    assert {f.record for f in ENTRY_FIELDS if f.time} == times == {"occurred_at", "recorded_at"}


def test_rows_and_columns_follow_the_definition() -> None:
    assert RAW_COLUMNS[: len(ENTRY_FIELDS)] == tuple(f.name for f in ENTRY_FIELDS)
    assert RAW_COLUMNS[len(ENTRY_FIELDS) :] == ("ledger_partition", "ledger_offset")
    assert len(RAW_COLUMN_TYPES) == len(RAW_COLUMNS)
    assert ENTRY_COLUMNS.split(", ")[:2] == ["user_id", "seq"]
    assert "occurred_at" in ENTRY_COLUMNS.split(", ")
    ruled = {name for _, name, _ in RULED_COLUMNS}
    assert {"user_id", "event_id", "reference", "scene", "model_alias"} <= ruled
    assert "kind" not in ruled  # a closed set, checked by the fold, not a free string


texts = st.none() | st.text(max_size=20)
entries = st.builds(
    Entry,
    user_id=st.text(min_size=1, max_size=20), seq=st.integers(1, 2**40),
    event_id=st.text(min_size=1, max_size=20), command_digest=st.text(max_size=32),
    kind=st.sampled_from(["charge", "purchase", "reward"]),
    amount_micro=st.integers(-(2**62), 2**62), balance_after_micro=st.integers(-(2**62), 2**62),
    occurred_at_ms=st.integers(0, 2**42), recorded_at_ms=st.integers(0, 2**42),
    reference=texts, scene=texts, request_id=texts, conversation_id=texts,
    model_alias=texts, upstream_model=texts, input_tokens=st.integers(0, 2**40),
    output_tokens=st.integers(0, 2**40), cached_tokens=st.integers(0, 2**40),
    reasoning_tokens=st.integers(0, 2**40), usage_estimated=st.booleans(),
    price_rule_id=texts, price_rule_version=st.none() | st.integers(1, 1000),
)  # fmt: skip


@given(entries)
def test_an_entry_survives_its_record_and_the_codec(entry: Entry) -> None:
    codec = load_codec(SCHEMAS)
    assert entry_from_record(entry_to_record(entry)) == entry
    decoded = codec.decode(codec.encode("credit.ledger.entries", entry_to_record(entry)))
    assert entry_from_record(decoded.record) == entry
