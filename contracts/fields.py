"""One rule per string field of a command or entry, written once (pure).

Every id or text that crosses a boundary (a proxy header, a store request,
a command the fold applies, an entry a projection stores) is checked here,
with ``fullmatch``, so a value one part accepts is never one another part
cannot store: a 10 KB user id or a NUL byte would otherwise reach a Postgres
index or a ``text`` column and stop the read models for everybody.

The rules (characters, then the length in characters):

- ids (``user_id``, ``request_id``, ``conversation_id``, the caller's event
  id): letters, digits and ``_ . : @ -``, starting with a letter or digit,
  1-128;
- names (``scene``, ``model_alias``, ``price_rule_id``, ``producer``, a
  service name): the same characters, 1-64;
- ``upstream_model``: as ids plus ``/`` (``org/model``), 1-128;
- ``event_id`` (namespaced by its producer, so longer): as ids plus ``/``,
  1-512;
- ``reference``: as ids plus ``/``, 1-300;
- ``note``: any text without control characters (no NUL), 0-500.

``schemas/avro/*.avsc`` documents each field with the name of its rule.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class FieldRule:
    name: str
    pattern: re.Pattern[str]
    description: str

    def ok(self, value: object) -> bool:
        return isinstance(value, str) and self.pattern.fullmatch(value) is not None

    def problem(self, field: str, value: object) -> str | None:
        """Why ``value`` breaks the rule (naming ``field``), or None when it is fine."""
        if self.ok(value):
            return None
        if not isinstance(value, str):
            return f"{field} must be a string, got {type(value).__name__}"
        if not value.strip():
            return f"{field} is empty"
        shown = value[:40].encode("unicode_escape").decode("ascii")
        more = f"... ({len(value)} characters)" if len(value) > 40 else ""
        return f"{field} '{shown}'{more} breaks the {self.name} rule: {self.description}"


def _rule(name: str, chars: str, most: int, what: str) -> FieldRule:
    pattern = re.compile(f"[A-Za-z0-9][{chars}]{{0,{most - 1}}}")
    return FieldRule(name, pattern, f"1-{most} characters of {what}, starting with a letter "
                     "or digit")  # fmt: skip


ID = _rule("id", r"A-Za-z0-9_.:@\-", 128, "letters, digits and _ . : @ -")
NAME = _rule("name", r"A-Za-z0-9_.:@\-", 64, "letters, digits and _ . : @ -")
MODEL = _rule("model", r"A-Za-z0-9_.:@/\-", 128, "letters, digits and _ . : @ / -")
EVENT_ID = _rule("event_id", r"A-Za-z0-9_.:@/\-", 512, "letters, digits and _ . : @ / -")
REFERENCE = _rule("reference", r"A-Za-z0-9_.:@/\-", 300, "letters, digits and _ . : @ / -")
NOTE = FieldRule("note", re.compile(r"[^\x00-\x1f\x7f]{0,500}"),
                 "0-500 characters, no control characters")  # fmt: skip

# Which rule each string field of a command or entry follows; None = the field is optional.
COMMAND_FIELDS: dict[str, FieldRule] = {
    "event_id": EVENT_ID, "user_id": ID, "scene": NAME, "request_id": ID,
    "conversation_id": ID, "model_alias": NAME, "upstream_model": MODEL,
    "price_rule_id": NAME, "producer": NAME, "reference": REFERENCE, "note": NOTE,
    "kind": NAME,
}  # fmt: skip
OPTIONAL_FIELDS = frozenset({"request_id", "conversation_id", "note"})


def field_problems(values: dict[str, object]) -> str | None:
    """The first field of ``values`` that breaks its rule, as a sentence; None if all fit.

    ``values`` maps field names (keys of :data:`COMMAND_FIELDS`) to values; an optional
    field may be None, and fields this module has no rule for are ignored."""
    for field, value in values.items():
        rule = COMMAND_FIELDS.get(field)
        if rule is None or (value is None and field in OPTIONAL_FIELDS):
            continue
        problem = rule.problem(field, value)
        if problem is not None:
            return problem
    return None
