"""Ledger entries as the projections handle them: one flat row per entry.

Decoding goes straight from the Avro record to a tuple in the column order of
the staging tables (times stay integer milliseconds; Postgres turns them into
timestamptz with integer arithmetic), because the projectors' cost is mostly
per-entry Python work. An entry that does not decode is not skipped: the
ledger is the truth, and a projection that silently missed an entry would be
wrong forever, so the projector stops and names the message.
"""

from __future__ import annotations

from dataclasses import dataclass
from operator import itemgetter
from typing import Any

from contracts.commands import ENTRY_FIELDS
from contracts.records import LEDGER_TOPIC, to_ms
from kernel.errors import CodecError, ProjectionError
from streams.codec import AvroCodec

# A row is an entry's fields in ENTRY_FIELDS order (times as epoch ms), then where it is in
# the ledger: the column order of the staging tables (see postgres_sink.RAW_COLUMNS_DDL).
RAW_COLUMNS = (*(f.name for f in ENTRY_FIELDS), "ledger_partition", "ledger_offset")
_AT = {name: index for index, name in enumerate(RAW_COLUMNS)}
USER, SEQ, EVENT, KIND = _AT["user_id"], _AT["seq"], _AT["event_id"], _AT["kind"]
AMOUNT, BALANCE = _AT["amount_micro"], _AT["balance_after_micro"]
OCCURRED_MS, RECORDED_MS = _AT["occurred_at_ms"], _AT["recorded_at_ms"]
PARTITION, OFFSET_COLUMN = _AT["ledger_partition"], _AT["ledger_offset"]
SCENE, MODEL_ALIAS = _AT["scene"], _AT["model_alias"]
TOKENS = tuple(_AT[n] for n in ("input_tokens", "output_tokens", "cached_tokens",
                                "reasoning_tokens"))  # fmt: skip

# The string columns an entry's field rules apply to (contracts.fields); None = not set.
RULED_COLUMNS = tuple((i, f.name, f.rule) for i, f in enumerate(ENTRY_FIELDS) if f.rule)
_TIME_COLUMNS = tuple(i for i, f in enumerate(ENTRY_FIELDS) if f.time)
_record_values = itemgetter(*(f.record for f in ENTRY_FIELDS))

Row = tuple[Any, ...]


@dataclass(frozen=True, slots=True)
class LogPosition:
    topic: str
    partition: int
    offset: int

    def __str__(self) -> str:
        return f"{self.topic}[{self.partition}]@{self.offset}"


def row_problem(row: Row) -> str | None:
    """Why the read models cannot store this entry (a field breaks its rule), or None.

    The fold refuses such commands, so only entries folded before it did (or by a buggy
    producer of the ledger topic) have one. They are quarantined, not applied: one bad id
    must not stop the projection of everybody else's entries (see the sinks)."""
    for index, name, rule in RULED_COLUMNS:
        value = row[index]
        if value is None and index not in (USER, EVENT):
            continue
        problem = rule.problem(name, value)
        if problem is not None:
            return problem
    return None


def split_storable(rows: list[Row]) -> tuple[list[Row], list[tuple[Row, str]]]:
    """``rows`` -> (the storable ones, the others with their problem), order kept."""
    good: list[Row] = []
    bad: list[tuple[Row, str]] = []
    for row in rows:
        problem = row_problem(row)
        if problem is None:
            good.append(row)
        else:
            bad.append((row, problem))
    return good, bad


def printable(value: object, most: int = 200) -> str:
    """A value as text any column can hold: escaped, no NUL, at most ``most`` characters."""
    text = value if isinstance(value, str) else repr(value)
    return text[:most].encode("unicode_escape").decode("ascii")[:most]


def decode_row(codec: AvroCodec, value: bytes | None, where: LogPosition) -> Row:
    try:
        r = codec.decode(value, expected=LEDGER_TOPIC, plain_times=True).record
    except CodecError as exc:
        raise ProjectionError(
            f"ledger entry at {where} does not decode ({exc.reason}): {exc}; the projection "
            "stops rather than skip a fact (check the topic with `creditledger ledger fold-check`)"
        ) from exc
    values = _record_values(r)
    if any(type(values[i]) is not int for i in _TIME_COLUMNS):
        # Older schema versions decode through the resolving reader, into datetimes.
        values = tuple(to_ms(v) if i in _TIME_COLUMNS else v for i, v in enumerate(values))
    return (*values, where.partition, where.offset)
