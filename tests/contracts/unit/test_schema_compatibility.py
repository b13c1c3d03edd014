"""Schema evolution: the current contract must read everything ever written.

Backward compatibility is checked with the Apache ``avro`` package's checker
against every released version in ``schemas/avro/history`` (transitively, not
only the previous one: a ledger topic is kept forever, so year-old events are
still read). The contract rules of the design are checked here too.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import avro.schema
import pytest
from avro.compatibility import ReaderWriterCompatibilityChecker, SchemaCompatibilityType

from kernel.settings import PROJECT_ROOT
from streams.codec import SchemaRegistry

AVRO_DIR = PROJECT_ROOT / "schemas" / "avro"
CURRENT = sorted(AVRO_DIR.glob("*.avsc"))
HISTORY = sorted((AVRO_DIR / "history").glob("*.avsc"))


def _compatible(reader: str, writer: str) -> tuple[bool, str]:
    result = ReaderWriterCompatibilityChecker().get_compatibility(  # type: ignore[no-untyped-call]
        avro.schema.parse(reader), avro.schema.parse(writer)
    )
    ok = result.compatibility is SchemaCompatibilityType.compatible
    return ok, "; ".join(str(m) for m in result.messages)


def _fields(path: Path) -> list[dict[str, Any]]:
    fields: list[dict[str, Any]] = json.loads(path.read_text())["fields"]
    return fields


def test_the_contracts_of_the_design_exist() -> None:
    # The ledger's four, and the plan plaza's events (issue 17).
    assert [p.stem for p in CURRENT] == [
        "credit.charge.requested",
        "credit.commands.rejected",
        "credit.grant.requested",
        "credit.ledger.entries",
        "plaza.events",
    ]


@pytest.mark.parametrize("released", HISTORY, ids=lambda p: p.name)
def test_current_reads_every_released_version(released: Path) -> None:
    event_type = released.name.rsplit(".v", 1)[0]
    current = AVRO_DIR / f"{event_type}.avsc"
    ok, why = _compatible(current.read_text(), released.read_text())
    assert ok, f"{current.name} cannot read data written with {released.name}: {why}"


@pytest.mark.parametrize("current", CURRENT, ids=lambda p: p.name)
def test_current_version_is_released(current: Path) -> None:
    registry = SchemaRegistry.from_dir(AVRO_DIR)
    event_type = current.stem
    released = [v for v in registry.versions() if v.event_type == event_type]
    latest = max((v for v in released if v.version != "current"),
                 key=lambda v: int(v.version[1:]), default=None)  # fmt: skip
    assert latest is not None, f"{current.name} has no released version in history/"
    assert latest.fingerprint == registry.current(event_type).fingerprint, (
        f"{current.name} differs from its latest release {latest.path.name}: "
        f"copy it to history/ as the next version (see history/README.md)"
    )


def test_history_versions_are_numbered_without_gaps() -> None:
    by_type: dict[str, list[int]] = {}
    for path in HISTORY:
        event_type, version = path.name.removesuffix(".avsc").rsplit(".v", 1)
        by_type.setdefault(event_type, []).append(int(version))
    for event_type, versions in by_type.items():
        assert sorted(versions) == list(range(1, len(versions) + 1)), event_type


def test_the_checker_catches_a_field_added_without_default() -> None:
    # Guards the guard: if the checker silently passed everything, the test above
    # would be worthless.
    writer = (AVRO_DIR / "credit.grant.requested.avsc").read_text()
    reader = json.loads(writer)
    reader["fields"].append({"name": "currency", "type": "string"})
    ok, why = _compatible(json.dumps(reader), writer)
    assert not ok
    assert "currency" in why


def test_the_checker_accepts_a_field_added_with_default() -> None:
    writer = (AVRO_DIR / "credit.grant.requested.avsc").read_text()
    reader = json.loads(writer)
    reader["fields"].append({"name": "currency", "type": "string", "default": "credit"})
    ok, why = _compatible(json.dumps(reader), writer)
    assert ok, why


def test_an_old_version_decodes_into_the_current_shape(tmp_path: Path) -> None:
    # A full evolution step through the real registry and codec: v1 written, v2 read.
    from streams.codec import AvroCodec
    from streams.examples import example_events

    v1 = (AVRO_DIR / "credit.grant.requested.avsc").read_text()
    v2 = json.loads(v1)
    v2["fields"].append({"name": "campaign", "type": ["null", "string"], "default": None})
    (tmp_path / "history").mkdir()
    (tmp_path / "history" / "credit.grant.requested.v1.avsc").write_text(v1)
    (tmp_path / "history" / "credit.grant.requested.v2.avsc").write_text(json.dumps(v2))
    (tmp_path / "credit.grant.requested.avsc").write_text(json.dumps(v2))
    old = AvroCodec(SchemaRegistry.from_dir(AVRO_DIR))
    new = AvroCodec(SchemaRegistry.from_dir(tmp_path))
    record = example_events()["credit.grant.requested"]
    decoded = new.decode(old.encode("credit.grant.requested", record))
    assert decoded.writer.version == "v1"
    assert decoded.record == {**record, "campaign": None}


@pytest.mark.parametrize("path", CURRENT + HISTORY, ids=lambda p: p.name)
def test_money_is_long_and_time_is_timestamp_millis(path: Path) -> None:
    for field in _fields(path):
        name, kind = field["name"], field["type"]
        if name.endswith("_micro"):
            assert kind == "long", f"{path.name}: {name} must be long micro-credits, is {kind}"
        if name.endswith("_at"):
            assert kind == {"type": "long", "logicalType": "timestamp-millis"}, (
                f"{path.name}: {name} must be timestamp-millis"
            )
        assert "float" not in json.dumps(kind)
        assert "double" not in json.dumps(kind)


@pytest.mark.parametrize("path", CURRENT, ids=lambda p: p.name)
def test_optional_fields_default_to_null(path: Path) -> None:
    for field in _fields(path):
        if isinstance(field["type"], list) and field["type"][0] == "null":
            assert "default" in field or field["name"] == "original_value", (
                f"{path.name}: optional {field['name']} needs a default"
            )
