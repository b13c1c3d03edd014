"""The plan plaza's rules, pure: no SQL, no HTTP, no clock of its own.

- tags: trimmed, NFKC case-folded, inner spaces as one, bounded in length and count, at
  least one (the configured default, or a precise refusal);
- who may change what: only a plan's author edits or withdraws it, only a comment's
  author deletes it; a withdrawn plan, or another user's private copy, is not found;
- the keyset cursors of the listings and the comment threads;
- the events a change emits (:class:`contracts.plaza.PlazaEvent`).
"""

from __future__ import annotations

import re
import secrets
import unicodedata
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from contracts.plaza import PlazaEvent, import_event_id
from contracts.records import to_ms
from kernel.errors import PlazaForbidden, PlazaInvalid, PlazaNotFound

Sort = Literal["newest", "popular"]

PLAN_ID = re.compile(r"p_[0-9a-f]{24}")
# Letters and digits of any script, and - _ . + # (c++, c#, node.js); inner spaces allowed.
TAG = re.compile(r"[^\W_](?:[\w.+#-]| (?! ))*")
MAX_COMMENT_DEPTH = 32


def new_plan_id() -> str:
    return "p_" + secrets.token_hex(12)


@dataclass(frozen=True, slots=True)
class TagRules:
    default: str | None
    max_tags: int
    max_chars: int


def normalise_tag(raw: str, max_chars: int) -> str:
    tag = " ".join(unicodedata.normalize("NFKC", raw).casefold().split())
    if not tag:
        raise PlazaInvalid("invalid_tag", "a tag may not be empty")
    if len(tag) > max_chars:
        raise PlazaInvalid("invalid_tag", f"a tag has at most {max_chars} characters: "
                           f"{tag[:max_chars]!r}...")  # fmt: skip
    if not TAG.fullmatch(tag):
        raise PlazaInvalid("invalid_tag", f"a tag is letters, digits, spaces and - _ . + #, "
                           f"starting with a letter or digit: {tag!r}")  # fmt: skip
    return tag


def normalise_tags(raw: list[str] | None, rules: TagRules) -> tuple[str, ...]:
    """The plan's tags, normalised and deduplicated in their order; at least one."""
    tags: list[str] = []
    for item in raw or []:
        tag = normalise_tag(item, rules.max_chars)
        if tag not in tags:
            tags.append(tag)
    if not tags:
        if rules.default is None:
            raise PlazaInvalid("tags_required", "a plan needs at least one tag (this plaza "
                               "has no default tag)")  # fmt: skip
        tags = [normalise_tag(rules.default, rules.max_chars)]
    if len(tags) > rules.max_tags:
        raise PlazaInvalid("too_many_tags", f"a plan has at most {rules.max_tags} tags, "
                           f"not {len(tags)}")  # fmt: skip
    return tuple(tags)


# -- who may see and change what ---------------------------------------------------------------


def visible(plan: dict[str, Any], user_id: str) -> dict[str, Any]:
    """The plan, if ``user_id`` may see it: published plans to everyone, withdrawn ones and
    private copies only to their author. Otherwise not found, never "forbidden": that would
    tell a stranger the plan exists."""
    if plan["status"] != "published" and plan["author_id"] != user_id:
        raise PlazaNotFound("plan_not_found", f"no plan {plan['plan_id']!r}")
    return plan


def check_author(plan: dict[str, Any], user_id: str, action: str) -> None:
    visible(plan, user_id)
    if plan["author_id"] != user_id:
        raise PlazaForbidden("not_author", f"only the plan's author may {action} it")
    if plan["status"] == "withdrawn":
        raise PlazaNotFound("plan_not_found", f"plan {plan['plan_id']!r} was withdrawn")


def check_published(plan: dict[str, Any], user_id: str, action: str) -> None:
    """Likes, imports and comments are for published plans."""
    visible(plan, user_id)
    if plan["status"] != "published":
        raise PlazaInvalid("plan_not_published", f"only a published plan can be {action}")


def check_reply(parent: dict[str, Any] | None, plan_id: str) -> None:
    if parent is None or parent["plan_id"] != plan_id:
        raise PlazaNotFound("comment_not_found", "the comment replied to is not in this plan")
    if len(parent["path"]) >= MAX_COMMENT_DEPTH:
        raise PlazaInvalid("thread_too_deep", f"replies nest at most {MAX_COMMENT_DEPTH} deep")


def check_comment_author(comment: dict[str, Any], user_id: str) -> None:
    if comment["author_id"] != user_id:
        raise PlazaForbidden("not_author", "only a comment's author may delete it")


# -- keyset cursors ----------------------------------------------------------------------------

LIST_CURSOR = re.compile(r"(\d{1,19})~(p_[0-9a-f]{24})")
THREAD_CURSOR = re.compile(r"\d{1,19}(?:\.\d{1,19}){0,31}")


def list_cursor(sort: Sort, plan: dict[str, Any]) -> str:
    """Where the next page of a listing starts: the last plan's sort key and id."""
    key = to_ms_us(plan["created_at"]) if sort == "newest" else plan["popularity"]
    return f"{key}~{plan['plan_id']}"


def parse_list_cursor(cursor: str) -> tuple[int, str]:
    match = LIST_CURSOR.fullmatch(cursor)
    if match is None:
        raise PlazaInvalid("invalid_cursor", "cursor is the next_cursor of a listing's page")
    return int(match[1]), match[2]


def thread_cursor(path: list[int]) -> str:
    return ".".join(map(str, path))


def parse_thread_cursor(cursor: str) -> list[int]:
    if not THREAD_CURSOR.fullmatch(cursor):
        raise PlazaInvalid("invalid_cursor", "cursor is the next_cursor of a thread's page")
    path = [int(part) for part in cursor.split(".")]
    if any(part >= 2**63 for part in path):
        raise PlazaInvalid("invalid_cursor", "cursor is the next_cursor of a thread's page")
    return path


def to_ms_us(at: datetime) -> int:
    """Microseconds since the epoch: Postgres' own precision, so a cursor is exact."""
    return to_ms(at) * 1000 + at.microsecond % 1000


# -- events --------------------------------------------------------------------------------


def event(kind: str, plan: dict[str, Any], actor_id: str, at: datetime, producer: str,
          **extra: Any) -> PlazaEvent:  # fmt: skip
    """The event of one change of ``plan`` by ``actor_id``."""
    if kind == "plan.imported":
        event_id = import_event_id(plan["plan_id"], actor_id)
    else:
        event_id = f"plaza:{kind}:{secrets.token_hex(12)}"
    if kind in ("plan.published", "plan.updated"):
        extra = {"title": plan["title"], "tags": tuple(plan["tags"]), **extra}
    return PlazaEvent(event_id=event_id, type=kind, plan_id=plan["plan_id"],
                      author_id=plan["author_id"], actor_id=actor_id,
                      occurred_at_ms=to_ms(at), producer=producer, **extra)  # fmt: skip
