"""The plan plaza's events, as the plaza writes them and the store's event rewards read them.

One Avro contract (``schemas/avro/plaza.events.avsc``) for every kind of change, told
apart by ``type``, so one topic keyed by plan id keeps each plan's events in order and a
consumer decodes them all with one schema. ``type`` is also the CloudEvents ``ce_type``
and the ``trigger_event`` an event reward rule names (e.g. ``plan.imported``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from contracts.records import to_ms

PLAZA_EVENTS = "plaza.events"  # the contract's name, and the topic's default name

PlazaEventType = Literal[
    "plan.published", "plan.updated", "plan.withdrawn", "plan.imported",
    "plan.liked", "plan.unliked", "comment.posted", "comment.deleted",
]  # fmt: skip
PLAZA_EVENT_TYPES: tuple[str, ...] = PlazaEventType.__args__  # type: ignore[attr-defined]


def import_event_id(plan_id: str, user_id: str) -> str:
    """The one event id of ``user_id`` importing ``plan_id``: an import happens once per user
    and plan, so a reward keyed by this id is granted once however often the event is read."""
    return f"plaza:import:{plan_id}:{user_id}"


@dataclass(frozen=True, slots=True)
class PlazaEvent:
    event_id: str
    type: str
    plan_id: str
    author_id: str
    actor_id: str
    occurred_at_ms: int
    producer: str
    title: str | None = None
    tags: tuple[str, ...] = field(default_factory=tuple)
    copy_id: str | None = None
    comment_id: int | None = None
    parent_id: int | None = None

    def __post_init__(self) -> None:
        if self.type not in PLAZA_EVENT_TYPES:
            raise ValueError(f"{self.type!r} is not a plaza event type")

    def to_record(self) -> dict[str, Any]:
        return {"event_id": self.event_id, "type": self.type, "plan_id": self.plan_id,
                "author_id": self.author_id, "actor_id": self.actor_id,
                "occurred_at": self.occurred_at_ms, "producer": self.producer,
                "title": self.title, "tags": list(self.tags), "copy_id": self.copy_id,
                "comment_id": self.comment_id, "parent_id": self.parent_id}  # fmt: skip

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> PlazaEvent:
        return cls(event_id=record["event_id"], type=record["type"], plan_id=record["plan_id"],
                   author_id=record["author_id"], actor_id=record["actor_id"],
                   occurred_at_ms=to_ms(record["occurred_at"]), producer=record["producer"],
                   title=record["title"], tags=tuple(record["tags"]),
                   copy_id=record["copy_id"], comment_id=record["comment_id"],
                   parent_id=record["parent_id"])  # fmt: skip
