"""Avro single-object encoding without a schema registry.

Wire format (Avro spec, "Single object encoding"): the two marker bytes
``C3 01``, the 8-byte little-endian CRC-64-AVRO fingerprint of the writer
schema's Parsing Canonical Form, then the Avro binary body.

The schemas live in git (``schemas/avro``): the current version of each event
type as ``<event type>.avsc`` and every earlier released version under
``history/``. All are registered by fingerprint, so an event written with an
old version still decodes, resolved into the current shape. Swapping to a
schema registry later only changes how a fingerprint is looked up.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fastavro
from fastavro.schema import fingerprint, to_parsing_canonical_form
from fastavro.validation import ValidationError, validate

from kernel.errors import CodecError, EncodeError, MalformedMessageError, UnknownSchemaError

MARKER = b"\xc3\x01"
HEADER_SIZE = len(MARKER) + 8
HISTORY_NAME = re.compile(r"^(?P<event_type>.+)\.v(?P<version>\d+)\.avsc$")

Record = dict[str, Any]


@dataclass(frozen=True)
class SchemaVersion:
    """One version of one event type's contract."""

    event_type: str
    version: str  # "current" or "v<N>"
    fingerprint: bytes
    schema: Any  # fastavro's parsed schema
    canonical_form: str
    path: Path
    # The same schema without logical types: timestamps read as int milliseconds.
    # Logical types are not part of the canonical form, so the fingerprint is the same.
    plain_schema: Any = None


@dataclass(frozen=True)
class Decoded:
    event_type: str
    record: Record
    writer: SchemaVersion


def _load(path: Path, event_type: str, version: str) -> SchemaVersion:
    try:
        raw = json.loads(path.read_text())
        # A fresh named-type table per file: versions may redefine the same enum.
        parsed = fastavro.parse_schema(raw, named_schemas={})
    except (OSError, ValueError, fastavro.schema.SchemaParseException) as exc:
        raise CodecError(f"schema {path} cannot be loaded: {exc}") from exc
    canonical = to_parsing_canonical_form(parsed)
    plain = fastavro.parse_schema(_without_logical_types(raw), named_schemas={})
    return SchemaVersion(
        event_type=event_type,
        version=version,
        fingerprint=bytes.fromhex(fingerprint(canonical, "CRC-64-AVRO")),
        schema=parsed,
        canonical_form=canonical,
        path=path,
        plain_schema=plain,
    )


def _without_logical_types(node: Any) -> Any:
    if isinstance(node, dict):
        if "logicalType" in node:
            return {k: _without_logical_types(v) for k, v in node.items() if k != "logicalType"}
        return {k: _without_logical_types(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_without_logical_types(item) for item in node]
    return node


class SchemaRegistry:
    """Known schemas by event type (current version) and by fingerprint (all versions)."""

    def __init__(self, versions: list[SchemaVersion]) -> None:
        self._all = sorted(versions, key=lambda v: (v.event_type, v.version))
        self._current: dict[str, SchemaVersion] = {}
        self._by_fingerprint: dict[bytes, SchemaVersion] = {}
        for version in versions:
            if version.version == "current":
                self._current[version.event_type] = version
            known = self._by_fingerprint.get(version.fingerprint)
            # The current schema is normally also released as history/<type>.v<N>;
            # the fingerprint is the same, so either answers, and "current" reads better.
            if known is None or version.version == "current":
                self._by_fingerprint[version.fingerprint] = version
        orphans = {v.event_type for v in versions} - set(self._current)
        if orphans:
            raise CodecError(
                f"history versions without a current schema: {', '.join(sorted(orphans))}"
            )

    @classmethod
    def from_dir(cls, directory: Path) -> SchemaRegistry:
        if not directory.is_dir():
            raise CodecError(f"schema directory {directory} does not exist")
        versions = [_load(p, p.name.removesuffix(".avsc"), "current")
                    for p in sorted(directory.glob("*.avsc"))]  # fmt: skip
        for path in sorted((directory / "history").glob("*.avsc")):
            match = HISTORY_NAME.match(path.name)
            if match is None:
                raise CodecError(f"{path}: history files are named <event type>.v<N>.avsc")
            versions.append(_load(path, match["event_type"], f"v{match['version']}"))
        if not versions:
            raise CodecError(f"no .avsc files in {directory}")
        return cls(versions)

    @property
    def event_types(self) -> list[str]:
        return sorted(self._current)

    def current(self, event_type: str) -> SchemaVersion:
        try:
            return self._current[event_type]
        except KeyError:
            known = ", ".join(self.event_types)
            raise UnknownSchemaError(
                f"no schema for event type {event_type!r} (known: {known})"
            ) from None

    def by_fingerprint(self, value: bytes) -> SchemaVersion | None:
        return self._by_fingerprint.get(value)

    def versions(self) -> list[SchemaVersion]:
        """Every loaded file, current and released, sorted by event type and version."""
        return list(self._all)


def _preview(data: bytes) -> str:
    head = data[:16].hex(" ")
    return f"{len(data)} bytes starting {head}{' ...' if len(data) > 16 else ''}"


class AvroCodec:
    """Encode records of a known event type; decode any registered version."""

    def __init__(self, registry: SchemaRegistry) -> None:
        self.registry = registry

    def encode(self, event_type: str, record: Mapping[str, Any], *, checked: bool = True) -> bytes:
        """Encode with the current schema of ``event_type``.

        Validation is on by default because fastavro, unvalidated, silently
        truncates a float written to a long field. ``checked=False`` is for
        records the caller built from already validated integers (the ledger's
        entries), where validation would be most of the per-event cost.
        """
        version = self.registry.current(event_type)
        try:
            if checked:
                validate(record, version.schema, raise_errors=True)
        except ValidationError as exc:
            problems = "; ".join(str(error) for error in exc.errors)
            raise EncodeError(
                f"{event_type}: record does not match its schema: {problems}"
            ) from exc
        buffer = io.BytesIO()
        buffer.write(MARKER)
        buffer.write(version.fingerprint)
        fastavro.schemaless_writer(buffer, version.schema, record)
        return buffer.getvalue()

    def decode(
        self, data: bytes | None, expected: str | None = None, *, plain_times: bool = False
    ) -> Decoded:
        """Decode ``data``; with ``expected``, also insist on that event type.

        ``plain_times=True`` returns timestamps as int milliseconds instead of
        datetimes when the writer is the current schema (the hot paths want ints).
        """
        if data is None:
            raise MalformedMessageError("message has no value (a tombstone or an empty send)")
        if len(data) < HEADER_SIZE or data[:2] != MARKER:
            raise MalformedMessageError(
                f"not Avro single-object encoding (marker C3 01 + 8-byte fingerprint): "
                f"{_preview(data)}"
            )
        fp = data[2:HEADER_SIZE]
        writer = self.registry.by_fingerprint(fp)
        if writer is None:
            raise UnknownSchemaError(
                f"unknown schema fingerprint {fp.hex()} (known event types: "
                f"{', '.join(self.registry.event_types)}); {_preview(data)}"
            )
        if expected is not None and writer.event_type != expected:
            raise UnknownSchemaError(
                f"expected a {expected} event, got {writer.event_type} ({writer.version})"
            )
        reader = self.registry.current(writer.event_type)
        body = io.BytesIO(data)
        body.seek(HEADER_SIZE)
        try:
            if reader is writer or reader.fingerprint == writer.fingerprint:
                schema = writer.plain_schema if plain_times else writer.schema
                record = fastavro.schemaless_reader(body, schema, None)
            else:
                record = fastavro.schemaless_reader(body, writer.schema, reader.schema)
        except Exception as exc:  # fastavro raises EOFError, ValueError, UnicodeDecodeError...
            raise MalformedMessageError(
                f"{writer.event_type} ({writer.version}) body does not decode: "
                f"{type(exc).__name__}: {exc}; {_preview(data)}"
            ) from exc
        if body.tell() != len(data):
            raise MalformedMessageError(
                f"{writer.event_type} ({writer.version}): {len(data) - body.tell()} unexpected "
                f"trailing bytes; {_preview(data)}"
            )
        if not isinstance(record, dict):
            raise MalformedMessageError(f"{writer.event_type}: body is not a record")
        return Decoded(writer.event_type, record, writer)


def load_codec(avro_dir: Path) -> AvroCodec:
    return AvroCodec(SchemaRegistry.from_dir(avro_dir))
