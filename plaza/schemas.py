"""Request bodies of the plaza API (pydantic), with the bounds that keep bad input a 4xx.

Every text is bounded and refuses control characters (a NUL would be a Postgres error;
the others have no business in a title), except that the long texts keep newlines and
tabs. Tags are normalised by :func:`plaza.domain.normalise_tags`, which knows the
configured default. HTML is stored as typed: the page shows all of it as text.
"""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

CONTROL = re.compile(r"[\x00-\x1f\x7f]")
CONTROL_BUT_LINES = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def _line(value: str) -> str:
    if CONTROL.search(value):
        raise ValueError("must not contain control characters")
    if not value.strip():
        raise ValueError("must not be blank")
    return value.strip()


def _text(value: str) -> str:
    if CONTROL_BUT_LINES.search(value):
        raise ValueError("must not contain control characters other than newline and tab")
    return value.strip()


Line = Annotated[str, AfterValidator(_line)]
Text = Annotated[str, AfterValidator(_text)]
PlanId = Annotated[str, Field(pattern=r"^p_[0-9a-f]{24}$")]
CommentId = Annotated[int, Field(ge=1, le=2**63 - 1)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Step(Strict):
    title: Annotated[Line, Field(min_length=1, max_length=200)]
    detail: Annotated[Text, Field(max_length=4000)] = ""
    duration_minutes: int | None = Field(None, ge=1, le=60 * 24 * 365)


class PlanIn(Strict):
    title: Annotated[Line, Field(min_length=1, max_length=200)]
    summary: Annotated[Text, Field(max_length=2000)] = ""
    steps: list[Step] = Field(min_length=1, max_length=50)
    tags: list[Annotated[str, Field(max_length=200)]] = Field(
        default_factory=list, max_length=64,
        description="At least one after normalisation; none: the plaza's default tag, or "
        "422 tags_required when it has none.",
    )  # fmt: skip


class CommentIn(Strict):
    body: Annotated[Text, Field(min_length=1, max_length=4000)]
    parent_id: CommentId | None = Field(None, description="The comment replied to.")
