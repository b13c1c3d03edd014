"""The ledger's invariants, checked entry by entry (pure: feed it entries in log order).

- per user, ``seq`` is 1, 2, 3, ... without gaps;
- each ``balance_after_micro`` = the previous one + ``amount_micro``;
- an entry appearing twice at the same ``(user_id, seq)`` is a redelivery and
  must be identical; different content there is a fork of the ledger;
- an ``event_id`` is applied once: seen again at another place (or with another
  command digest), it is an idempotency violation.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from contracts.commands import Entry


@dataclass(frozen=True)
class Violation:
    rule: str
    user_id: str
    seq: int
    detail: str
    where: str  # topic[partition]@offset of the offending entry

    def __str__(self) -> str:
        return f"{self.rule}: user {self.user_id!r} seq {self.seq} at {self.where}: {self.detail}"


@dataclass
class UserChain:
    seq: int = 0
    balance_micro: int = 0
    last: Entry | None = None
    entries: dict[int, Entry] = field(default_factory=dict)


class FoldChecker:
    """Folds entries and remembers the first violation (and how many there were)."""

    def __init__(self, keep_entries: bool = False) -> None:
        self.users: dict[str, UserChain] = {}
        self.events: dict[str, tuple[str, int, str]] = {}
        self.entries = 0
        self.redelivered = 0
        self.violations = 0
        self.first_violation: Violation | None = None
        self._keep = keep_entries
        # Only the last entry per user is needed to check chains; older ones are
        # kept (optionally) to tell an identical redelivery from a fork.
        self._recent: dict[tuple[str, int], Entry] = {}

    def _violate(self, rule: str, entry: Entry, detail: str, where: str) -> None:
        self.violations += 1
        if self.first_violation is None:
            self.first_violation = Violation(rule, entry.user_id, entry.seq, detail, where)

    def add(self, entry: Entry, where: str = "?") -> None:
        self.entries += 1
        chain = self.users.setdefault(entry.user_id, UserChain())
        if entry.seq <= chain.seq:
            earlier = self._recent.get((entry.user_id, entry.seq))
            if earlier is None and chain.last is not None and chain.last.seq == entry.seq:
                earlier = chain.last
            if earlier == entry:
                self.redelivered += 1
            elif earlier is None:
                self.redelivered += 1  # not kept: identical by event_id and digest at least
                known = self.events.get(entry.event_id)
                if known != (entry.user_id, entry.seq, entry.command_digest):
                    self._violate("fork", entry, "another entry already holds this seq", where)
            else:
                self._violate(
                    "fork", entry,
                    f"differs from the entry already at this seq (event {earlier.event_id!r})",
                    where,
                )  # fmt: skip
            return
        if entry.seq != chain.seq + 1:
            self._violate("seq_gap", entry, f"expected seq {chain.seq + 1}", where)
        expected_balance = chain.balance_micro + entry.amount_micro
        if entry.balance_after_micro != expected_balance:
            self._violate(
                "balance", entry,
                f"balance_after {entry.balance_after_micro} != previous {chain.balance_micro} "
                f"+ amount {entry.amount_micro} = {expected_balance}",
                where,
            )  # fmt: skip
        known = self.events.get(entry.event_id)
        if known is not None:
            self._violate(
                "event_id_twice", entry,
                f"event {entry.event_id!r} already applied as seq {known[1]} of user {known[0]!r}",
                where,
            )  # fmt: skip
        else:
            self.events[entry.event_id] = (entry.user_id, entry.seq, entry.command_digest)
        chain.seq = entry.seq
        chain.balance_micro = entry.balance_after_micro
        chain.last = entry
        if self._keep:
            self._recent[(entry.user_id, entry.seq)] = entry

    @property
    def ok(self) -> bool:
        return self.first_violation is None
