"""The plaza's pure rules: tags, who may change what, cursors, search terms, events."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from contracts.plaza import PLAZA_EVENT_TYPES, PlazaEvent, import_event_id
from kernel.errors import PlazaForbidden, PlazaInvalid, PlazaNotFound
from plaza import domain
from plaza.search import tsquery, vector
from store.event_rewards import recipient

RULES = domain.TagRules(default="general", max_tags=3, max_chars=10)
NO_DEFAULT = domain.TagRules(default=None, max_tags=3, max_chars=10)
T0 = datetime(2026, 12, 1, 8, 30, 15, 123456, tzinfo=UTC)


def plan(**changes: Any) -> dict[str, Any]:
    return {"plan_id": "p_" + "a" * 24, "author_id": "alice", "status": "published",
            "title": "T", "tags": ("general",), **changes}  # fmt: skip


def test_tags_are_trimmed_folded_and_deduplicated_in_order() -> None:
    assert domain.normalise_tags(["  Python ", "python", "\uff2dachine  Learning", "c++"],
                                 domain.TagRules("general", 5, 20)) == (
        "python", "machine learning", "c++")  # fmt: skip


def test_no_tags_get_the_default_or_a_precise_refusal() -> None:
    assert domain.normalise_tags([], RULES) == ("general",)
    assert domain.normalise_tags(None, RULES) == ("general",)
    with pytest.raises(PlazaInvalid) as caught:
        domain.normalise_tags([], NO_DEFAULT)
    assert caught.value.code == "tags_required"


@pytest.mark.parametrize("raw", ["", "   ", "<script>", "a" * 11, "-dash", "nul\x00", "x  y"])
def test_a_bad_tag_is_refused(raw: str) -> None:
    if raw == "x  y":  # inner runs of spaces fold to one: valid
        assert domain.normalise_tag(raw, 10) == "x y"
        return
    with pytest.raises(PlazaInvalid) as caught:
        domain.normalise_tags([raw], RULES)
    assert caught.value.code == "invalid_tag"


def test_too_many_tags_are_refused() -> None:
    with pytest.raises(PlazaInvalid) as caught:
        domain.normalise_tags(["a", "b", "c", "d"], RULES)
    assert caught.value.code == "too_many_tags"
    assert domain.normalise_tags(["学习", "计划"], RULES) == ("学习", "计划")


def test_only_the_author_edits_and_strangers_never_see_private_plans() -> None:
    domain.check_author(plan(), "alice", "edit")
    with pytest.raises(PlazaForbidden):
        domain.check_author(plan(), "bob", "edit")
    with pytest.raises(PlazaNotFound):  # not "forbidden": that would say it exists
        domain.visible(plan(status="private"), "bob")
    with pytest.raises(PlazaNotFound):
        domain.check_author(plan(status="withdrawn"), "alice", "edit")
    with pytest.raises(PlazaInvalid):
        domain.check_published(plan(status="private"), "alice", "liked")


def test_replies_stay_in_their_plan_and_nest_boundedly() -> None:
    domain.check_reply({"plan_id": "p1", "path": [1, 2]}, "p1")
    with pytest.raises(PlazaNotFound):
        domain.check_reply({"plan_id": "p2", "path": [1]}, "p1")
    with pytest.raises(PlazaInvalid):
        domain.check_reply({"plan_id": "p1", "path": list(range(32))}, "p1")


def test_cursors_round_trip_exactly_and_refuse_anything_else() -> None:
    row = {"plan_id": "p_" + "b" * 24, "created_at": T0, "popularity": 7}
    after, plan_id = domain.parse_list_cursor(domain.list_cursor("newest", row))
    assert (after % 1_000_000, plan_id) == (123456, row["plan_id"])
    assert domain.parse_list_cursor(domain.list_cursor("popular", row)) == (7, row["plan_id"])
    assert domain.parse_thread_cursor(domain.thread_cursor([3, 17, 99])) == [3, 17, 99]
    for bad in ["", "x", "1~p_zz", "1.2.", "99999999999999999999", "9223372036854775808"]:
        with pytest.raises(PlazaInvalid):
            domain.parse_thread_cursor(bad) if "~" not in bad else domain.parse_list_cursor(bad)


def lexemes(*texts: str) -> list[str]:
    return [part.rsplit(":", 1)[0].strip("'") for part in vector(*texts).split(" ")]


def test_chinese_is_indexed_as_characters_and_bigrams() -> None:
    assert lexemes("学习计划") == sorted(["学", "习", "计", "划", "学习", "习计", "计划"])
    assert lexemes("Learn Python, 学习!") == sorted(["learn", "python", "学", "习", "学习"])


def test_a_query_asks_for_words_by_prefix_and_chinese_by_phrase() -> None:
    assert tsquery("Pyth") == "'pyth':*"
    assert tsquery("计划") == "('计划')"
    assert tsquery("学习计划 run") == "('学习' <-> '习计' <-> '计划') & 'run':*"
    assert tsquery("学") == "'学'"
    assert tsquery("  ,;  ") is None
    assert tsquery("it's") == "'it':* & 's':*"


def test_quotes_and_backslashes_cannot_break_out_of_a_lexeme() -> None:
    assert vector("a'b") == "'a':1 'b':2"  # punctuation splits words
    assert tsquery("x' | 'y") == "'x':* & 'y':*"  # operators and quotes are not terms
    assert tsquery("a\\'b") == "'a':* & 'b':*"


def test_bigrams_of_a_phrase_stand_at_consecutive_positions() -> None:
    text = vector("我的学习计划")
    spots = dict(part.rsplit(":", 1) for part in text.split(" "))
    assert [int(spots[f"'{b}'"]) for b in ("学习", "习计", "计划")] == [3, 4, 5]


def test_an_import_has_one_event_id_and_rewards_only_others() -> None:
    event = domain.event("plan.imported", plan(), "bob", T0, "plaza", copy_id="p_" + "c" * 24)
    assert event.event_id == import_event_id(plan()["plan_id"], "bob")
    assert recipient(event) == "alice"
    own = domain.event("plan.imported", plan(), "alice", T0, "plaza")
    assert recipient(own) is None
    assert PlazaEvent.from_record({**event.to_record(), "occurred_at": T0}) == event
    with pytest.raises(ValueError):
        PlazaEvent.from_record({**event.to_record(), "occurred_at": T0, "type": "plan.exploded"})
    assert set(PLAZA_EVENT_TYPES) >= {"plan.published", "comment.deleted"}
