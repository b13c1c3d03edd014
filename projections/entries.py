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
from typing import Any

from contracts.fields import EVENT_ID, ID, MODEL, NAME, REFERENCE
from contracts.records import LEDGER_TOPIC, to_ms
from kernel.errors import CodecError, ProjectionError
from streams.codec import AvroCodec

# Column order of the staging tables (see postgres_sink.STAGE_DDL).
RAW_COLUMNS = (
    "user_id", "seq", "event_id", "command_digest", "kind", "amount_micro",
    "balance_after_micro", "reference", "scene", "request_id", "conversation_id",
    "model_alias", "upstream_model", "input_tokens", "output_tokens", "cached_tokens",
    "reasoning_tokens", "usage_estimated", "price_rule_id", "price_rule_version",
    "occurred_ms", "recorded_ms", "ledger_partition", "ledger_offset",
)  # fmt: skip
USER, SEQ, EVENT, KIND, AMOUNT, BALANCE, RECORDED_MS = 0, 1, 2, 4, 5, 6, 21
PARTITION, OFFSET_COLUMN = 22, 23

# The string columns an entry's field rules apply to (contracts.fields); None = not set.
RULED_COLUMNS = (
    (0, "user_id", ID), (2, "event_id", EVENT_ID), (7, "reference", REFERENCE),
    (8, "scene", NAME), (9, "request_id", ID), (10, "conversation_id", ID),
    (11, "model_alias", NAME), (12, "upstream_model", MODEL), (18, "price_rule_id", NAME),
)  # fmt: skip

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
    # to_ms: older schema versions decode through the resolving reader, into datetimes.
    return (
        r["user_id"], r["seq"], r["event_id"], r["command_digest"], r["kind"], r["amount_micro"],
        r["balance_after_micro"], r["reference"], r["scene"], r["request_id"],
        r["conversation_id"], r["model_alias"], r["upstream_model"], r["input_tokens"],
        r["output_tokens"], r["cached_tokens"], r["reasoning_tokens"], r["usage_estimated"],
        r["price_rule_id"], r["price_rule_version"], to_ms(r["occurred_at"]),
        to_ms(r["recorded_at"]), where.partition, where.offset,
    )  # fmt: skip
