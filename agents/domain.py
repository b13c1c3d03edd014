"""The ledger's rules: a pure fold of commands into entries.

Nothing here imports Kafka, Faust, Redis, Postgres or HTTP code. An adapter
looks up the slice of state a command needs (the account, and whether its
``event_id`` was seen), calls :func:`decide`, and persists what comes back.

Rules (see DESIGN.md):

- money is integer micro-credits; a charge is post-paid and always applied in
  full, so a balance may go negative (debt is recorded, not hidden);
- ``event_id`` is the idempotency key within the idempotency window (by
  ``occurred_at``, :attr:`Limits.idempotency_window_ms`): the same id with the
  same content is a :class:`Duplicate` that points at the first entry; with
  other content it is rejected as ``idempotency_conflict`` and never applied;
- a command the index does not know whose ``occurred_at`` is older than the
  window is ``stale``: the index may have forgotten its id, so it is never
  applied blindly (an operator re-drives it after checking the ledger, and the
  re-drive skips this rule). What the index does know is still a duplicate or a
  conflict, whatever its age;
- ``seq`` is gap-free per account: 1, 2, 3, ...;
- an entry is fully determined by (state, command, recorded_at_ms), so the fold
  gives the same ledger whenever it is replayed.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Literal

from contracts.commands import GRANT_KINDS, LONG_MAX, LONG_MIN, Charge, Command, Entry, Grant
from contracts.fields import EVENT_ID, ID, field_problems

RejectReason = Literal["malformed", "unknown_schema", "idempotency_conflict", "invalid", "stale"]
DAY_MS = 86_400_000


@dataclass(frozen=True, slots=True)
class Limits:
    """Configured bounds on what one command may move."""

    max_amount_micro: int = 1_000_000_000_000  # one million credits
    idempotency_window_ms: int = 35 * DAY_MS


@dataclass(frozen=True, slots=True)
class Account:
    balance_micro: int = 0
    seq: int = 0


@dataclass(frozen=True, slots=True)
class Seen:
    """What the processed-event index remembers of an applied ``event_id``."""

    user_id: str
    seq: int
    command_digest: str


@dataclass(frozen=True, slots=True)
class Applied:
    entry: Entry


@dataclass(frozen=True, slots=True)
class Duplicate:
    """The command was applied before, with the same content; nothing changes."""

    first: Seen


@dataclass(frozen=True, slots=True)
class Rejected:
    reason: RejectReason
    detail: str
    event_id: str | None = None
    user_id: str | None = None


Outcome = Applied | Duplicate | Rejected


def command_digest(command: Command) -> str:
    """A fingerprint of the command's content (``producer`` excluded: it is provenance).

    ``repr`` of str/int/bool/None is stable across runs and versions, and the
    field order is fixed by the dataclass, so the digest is deterministic.
    """
    if isinstance(command, Charge):
        parts: tuple[object, ...] = (
            "charge", command.event_id, command.user_id, command.scene, command.request_id,
            command.conversation_id, command.model_alias, command.upstream_model,
            command.input_tokens, command.output_tokens, command.cached_tokens,
            command.reasoning_tokens, command.usage_estimated, command.price_rule_id,
            command.price_rule_version, command.amount_micro, command.occurred_at_ms,
        )  # fmt: skip
    else:
        parts = (
            "grant", command.event_id, command.user_id, command.kind, command.amount_micro,
            command.reference, command.note, command.occurred_at_ms,
        )  # fmt: skip
    return hashlib.blake2b(repr(parts).encode(), digest_size=16).hexdigest()


def _is_int(value: object) -> bool:
    # Exactly int: bool is an int subclass, and money and counts must be real integers.
    return type(value) is int


def _string_fields(command: Command) -> dict[str, object]:
    if isinstance(command, Charge):
        return {
            "event_id": command.event_id, "user_id": command.user_id, "scene": command.scene,
            "request_id": command.request_id, "conversation_id": command.conversation_id,
            "model_alias": command.model_alias, "upstream_model": command.upstream_model,
            "price_rule_id": command.price_rule_id, "producer": command.producer,
        }  # fmt: skip
    return {
        "event_id": command.event_id, "user_id": command.user_id,
        "reference": command.reference, "note": command.note, "producer": command.producer,
    }  # fmt: skip


def validate(command: Command, limits: Limits) -> str | None:
    """The first thing wrong with the command, or None when it may be applied.

    Every string follows its rule in :mod:`contracts.fields`, so nothing the fold applies
    is an entry a projection cannot store (a 10 KB user id, a NUL in a reference)."""
    problem = field_problems(_string_fields(command))
    if problem is not None:
        return problem
    if not _is_int(command.amount_micro):
        return f"amount_micro must be an integer, got {type(command.amount_micro).__name__}"
    if command.amount_micro > limits.max_amount_micro:
        return (
            f"amount_micro {command.amount_micro} exceeds the configured maximum "
            f"{limits.max_amount_micro}"
        )
    if not _is_int(command.occurred_at_ms) or command.occurred_at_ms < 0:
        return "occurred_at is missing or before 1970"
    if isinstance(command, Charge):
        if command.amount_micro < 0:
            return f"charge amount_micro must be >= 0, got {command.amount_micro}"
        for name in ("input_tokens", "output_tokens", "cached_tokens", "reasoning_tokens"):
            value = getattr(command, name)
            if not _is_int(value) or value < 0:
                return f"{name} must be a non-negative integer, got {value!r}"
        if not _is_int(command.price_rule_version) or command.price_rule_version < 1:
            return f"price_rule_version must be >= 1, got {command.price_rule_version!r}"
        return None
    if command.kind not in GRANT_KINDS:
        return f"unknown grant kind {command.kind!r} (known: {', '.join(GRANT_KINDS)})"
    if command.amount_micro <= 0:
        return f"grant amount_micro must be > 0, got {command.amount_micro}"
    return None


def decide(
    account: Account,
    seen: Seen | None,
    command: Command,
    limits: Limits,
    recorded_at_ms: int,
    digest: str | None = None,
    now_ms: int | None = None,
) -> Outcome:
    """Fold one command into the account's state. Pure: no I/O, no clock.

    ``seen`` is the processed-event index's record for ``command.event_id``;
    ``recorded_at_ms`` comes from the command's message (its Kafka timestamp),
    so that deciding the same command again gives the identical entry.
    ``digest`` may be passed when the caller computed it already.
    ``now_ms`` is the folding worker's clock, for the idempotency window; None skips
    the window (a re-drive checked against the ledger).
    """
    problem = validate(command, limits)
    if problem is not None:
        # A dead letter names the command only by ids that are themselves well-formed.
        event_id = command.event_id if EVENT_ID.ok(command.event_id) else None
        user_id = command.user_id if ID.ok(command.user_id) else None
        return Rejected("invalid", problem, event_id, user_id)
    digest = digest or command_digest(command)
    if seen is not None:
        if seen.command_digest == digest:  # the digest covers user_id too
            return Duplicate(seen)
        return Rejected(
            "idempotency_conflict",
            f"event_id {command.event_id!r} was applied as entry {seen.seq} of user "
            f"{seen.user_id!r} with different content",
            command.event_id,
            command.user_id,
        )
    if now_ms is not None and command.occurred_at_ms < now_ms - limits.idempotency_window_ms:
        # The index may have forgotten an id this old: its silence proves nothing.
        age_ms = now_ms - command.occurred_at_ms
        return Rejected(
            "stale",
            f"occurred_at is {age_ms // DAY_MS} days {age_ms % DAY_MS // 3_600_000} hours "
            f"old ({age_ms} ms), older than the {limits.idempotency_window_ms // DAY_MS}-day "
            "idempotency window; re-drive it after checking the ledger",
            command.event_id,
            command.user_id,
        )
    if isinstance(command, Charge):
        return _apply_charge(account, command, digest, recorded_at_ms)
    return _apply_grant(account, command, digest, recorded_at_ms)


def _apply_charge(account: Account, command: Charge, digest: str,
                  recorded_at_ms: int) -> Outcome:  # fmt: skip
    """A charge is post-paid: applied in full, even into debt (only a 64-bit underflow,
    which could not be written, refuses it)."""
    amount = -command.amount_micro
    balance_after = account.balance_micro + amount
    if balance_after < LONG_MIN:
        return Rejected("invalid", "balance would underflow a 64-bit integer",
                        command.event_id, command.user_id)  # fmt: skip
    return Applied(Entry(
        user_id=command.user_id, seq=account.seq + 1, event_id=command.event_id,
        command_digest=digest, kind="charge", amount_micro=amount,
        balance_after_micro=balance_after, occurred_at_ms=command.occurred_at_ms,
        recorded_at_ms=recorded_at_ms, scene=command.scene, request_id=command.request_id,
        conversation_id=command.conversation_id, model_alias=command.model_alias,
        upstream_model=command.upstream_model, input_tokens=command.input_tokens,
        output_tokens=command.output_tokens, cached_tokens=command.cached_tokens,
        reasoning_tokens=command.reasoning_tokens, usage_estimated=command.usage_estimated,
        price_rule_id=command.price_rule_id, price_rule_version=command.price_rule_version,
    ))  # fmt: skip


def _apply_grant(account: Account, command: Grant, digest: str,
                 recorded_at_ms: int) -> Outcome:  # fmt: skip
    balance_after = account.balance_micro + command.amount_micro
    if balance_after > LONG_MAX:
        return Rejected("invalid", "balance would overflow a 64-bit integer",
                        command.event_id, command.user_id)  # fmt: skip
    return Applied(Entry(
        user_id=command.user_id, seq=account.seq + 1, event_id=command.event_id,
        command_digest=digest, kind=command.kind, amount_micro=command.amount_micro,
        balance_after_micro=balance_after, occurred_at_ms=command.occurred_at_ms,
        recorded_at_ms=recorded_at_ms, reference=command.reference,
    ))  # fmt: skip


def evolve(account: Account, entry: Entry) -> Account:
    """The account after ``entry``; entries must arrive in seq order, and each must move
    the balance by exactly its amount (the ledger's money identity: no entry creates or
    loses a micro-credit on its way into the state)."""
    if entry.seq != account.seq + 1:
        raise ValueError(f"entry seq {entry.seq} does not follow account seq {account.seq}")
    if entry.balance_after_micro != account.balance_micro + entry.amount_micro:
        raise ValueError(f"entry {entry.user_id}#{entry.seq}: balance_after "
                         f"{entry.balance_after_micro} != {account.balance_micro} + "
                         f"{entry.amount_micro}")  # fmt: skip
    return Account(balance_micro=entry.balance_after_micro, seq=entry.seq)


@dataclass
class Ledger:
    """The whole fold in memory: the reference the adapters must agree with.

    Used by the tests, by ``ledger fold-check`` style tools and by anyone who
    wants to know what a sequence of commands must produce.
    """

    limits: Limits = field(default_factory=Limits)
    accounts: dict[str, Account] = field(default_factory=dict)
    seen: dict[str, Seen] = field(default_factory=dict)
    entries: dict[tuple[str, int], Entry] = field(default_factory=dict)

    def apply(self, command: Command, recorded_at_ms: int) -> Outcome:
        account = self.accounts.get(command.user_id, Account())
        outcome = decide(account, self.seen.get(command.event_id), command, self.limits,
                         recorded_at_ms)  # fmt: skip
        if isinstance(outcome, Applied):
            entry = outcome.entry
            self.accounts[entry.user_id] = evolve(account, entry)
            self.seen[entry.event_id] = Seen(entry.user_id, entry.seq, entry.command_digest)
            self.entries[(entry.user_id, entry.seq)] = entry
        return outcome

    def first_entry(self, duplicate: Duplicate) -> Entry:
        """The entry a duplicate points at ("yields the first entry again")."""
        return self.entries[(duplicate.first.user_id, duplicate.first.seq)]
