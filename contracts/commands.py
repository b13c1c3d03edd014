"""The ledger's published types: the commands it folds and the entries it writes.

Producers (the proxy, the credit store) build :class:`Charge` and :class:`Grant`; the
fold (``agents/``) decides them into :class:`Entry`; the projections read entries back.
:mod:`contracts.records` maps each to its Avro record (``schemas/avro/``). Money is
integer micro-credits.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from contracts.fields import EVENT_ID, ID, MODEL, NAME, REFERENCE, FieldRule

GRANT_KINDS = ("purchase", "reward", "adjustment", "refund")
ENTRY_KINDS = ("charge", *GRANT_KINDS)

# Avro long bounds: an amount or balance outside them could not even be written.
LONG_MIN = -(2**63)
LONG_MAX = 2**63 - 1


@dataclass(frozen=True, slots=True)
class Charge:
    """Priced usage of one LLM call (``credit.charge.requested``)."""

    event_id: str
    user_id: str
    scene: str
    request_id: str | None
    conversation_id: str | None
    model_alias: str
    upstream_model: str
    input_tokens: int
    output_tokens: int
    cached_tokens: int
    reasoning_tokens: int
    usage_estimated: bool
    price_rule_id: str
    price_rule_version: int
    amount_micro: int
    occurred_at_ms: int
    producer: str


@dataclass(frozen=True, slots=True)
class Grant:
    """Credits given to an account (``credit.grant.requested``)."""

    event_id: str
    user_id: str
    kind: str
    amount_micro: int
    reference: str
    note: str | None
    occurred_at_ms: int
    producer: str


Command = Charge | Grant


@dataclass(frozen=True, slots=True)
class Entry:
    """One applied command; ``(user_id, seq)`` is its identity."""

    user_id: str
    seq: int
    event_id: str
    command_digest: str
    kind: str
    amount_micro: int
    balance_after_micro: int
    occurred_at_ms: int
    recorded_at_ms: int
    reference: str | None = None
    scene: str | None = None
    request_id: str | None = None
    conversation_id: str | None = None
    model_alias: str | None = None
    upstream_model: str | None = None
    input_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0
    reasoning_tokens: int = 0
    usage_estimated: bool = False
    price_rule_id: str | None = None
    price_rule_version: int | None = None


@dataclass(frozen=True, slots=True)
class EntryField:
    """One field of a ledger entry. :data:`ENTRY_FIELDS` is the one list of them: the Avro
    mapping (:mod:`contracts.records`), the projections' rows, their SQL column lists and
    the field rules the projectors check all derive from it."""

    name: str  # the attribute of Entry; also the column of the raw (staging) layout
    record: str  # the field of the Avro record; also the column of ledger_entries
    sql_type: str  # the raw column's Postgres type
    rule: FieldRule | None = None  # a string field's rule (contracts.fields)
    time: bool = False  # epoch ms in Entry and raw rows; timestamp-millis / timestamptz outside


# In the order of the projections' rows (an entry's flat tuple).
ENTRY_FIELDS: tuple[EntryField, ...] = (
    EntryField("user_id", "user_id", "text", ID),
    EntryField("seq", "seq", "bigint"),
    EntryField("event_id", "event_id", "text", EVENT_ID),
    EntryField("command_digest", "command_digest", "text"),
    EntryField("kind", "kind", "text"),
    EntryField("amount_micro", "amount_micro", "bigint"),
    EntryField("balance_after_micro", "balance_after_micro", "bigint"),
    EntryField("reference", "reference", "text", REFERENCE),
    EntryField("scene", "scene", "text", NAME),
    EntryField("request_id", "request_id", "text", ID),
    EntryField("conversation_id", "conversation_id", "text", ID),
    EntryField("model_alias", "model_alias", "text", NAME),
    EntryField("upstream_model", "upstream_model", "text", MODEL),
    EntryField("input_tokens", "input_tokens", "bigint"),
    EntryField("output_tokens", "output_tokens", "bigint"),
    EntryField("cached_tokens", "cached_tokens", "bigint"),
    EntryField("reasoning_tokens", "reasoning_tokens", "bigint"),
    EntryField("usage_estimated", "usage_estimated", "boolean"),
    EntryField("price_rule_id", "price_rule_id", "text", NAME),
    EntryField("price_rule_version", "price_rule_version", "integer"),
    EntryField("occurred_at_ms", "occurred_at", "bigint", time=True),
    EntryField("recorded_at_ms", "recorded_at", "bigint", time=True),
)  # fmt: skip
# A field added to Entry and not here (or the other way round) fails at import.
assert {f.name for f in ENTRY_FIELDS} == {f.name for f in fields(Entry)}, "ENTRY_FIELDS != Entry"
