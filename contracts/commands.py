"""The ledger's published types: the commands it folds and the entries it writes.

Producers (the proxy, the credit store) build :class:`Charge` and :class:`Grant`; the
fold (``agents/``) decides them into :class:`Entry`; the projections read entries back.
:mod:`contracts.records` maps each to its Avro record (``schemas/avro/``). Money is
integer micro-credits.
"""

from __future__ import annotations

from dataclasses import dataclass

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
