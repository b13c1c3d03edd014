"""The plaza API on a real plaza process and real Postgres: plans, tags, search, likes,
imports, comment threads, bad input, and the event each change writes to the outbox."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from contracts.plaza import import_event_id
from kernel.settings import Settings
from testbed.plaza import PlazaWorld, plaza_world
from testbed.topics import ScratchTopics


@pytest.fixture
def world(stack_settings: Settings, scratch: ScratchTopics, unique: str) -> Iterator[PlazaWorld]:
    with plaza_world(stack_settings, scratch, unique) as world:
        yield world


def types(world: PlazaWorld) -> list[str]:
    return [event.type for event in world.plaza_events()]


def test_publish_gets_the_default_tag_or_a_precise_422(world: PlazaWorld) -> None:
    alice = world.token("alice")
    plan = world.publish(alice, "Morning run", tags=[])
    assert plan["tags"] == ["general"]
    plan = world.publish(alice, "Evening run", tags=["  Running ", "running", "Health"])
    assert plan["tags"] == ["running", "health"]
    world.stop("plaza")
    world.start_plaza(default_tag="")  # switched off
    status, body = world.plaza("POST", "/plans", token=alice, body={
        "title": "No tags", "steps": [{"title": "x"}], "tags": []})  # fmt: skip
    assert (status, body["error"]["code"]) == (422, "tags_required")
    assert world.plaza("GET", "/config", token=alice)[1]["default_tag"] is None
    assert types(world) == ["plan.published", "plan.published"]  # the refusal wrote nothing


def test_only_the_author_edits_or_withdraws_and_withdrawn_plans_vanish(world: PlazaWorld) -> None:
    alice, bob = world.token("alice"), world.token("bob")
    plan = world.publish(alice, "Learn piano", tags=["music"])
    path = f"/plans/{plan['plan_id']}"
    edit = {"title": "Learn piano, slowly", "summary": "s", "steps": [{"title": "Scales"}],
            "tags": ["music", "practice"]}  # fmt: skip
    status, body = world.plaza("PUT", path, token=bob, body=edit)
    assert (status, body["error"]["code"]) == (403, "not_author")
    assert world.plaza("DELETE", path, token=bob)[0] == 403
    status, body = world.plaza("PUT", path, token=alice, body=edit)
    assert status == 200 and body["title"] == "Learn piano, slowly"
    assert body["steps"] == [{"title": "Scales", "detail": "", "duration_minutes": None}]
    tags = {t["tag"]: t["plans"] for t in world.plaza("GET", "/tags", token=bob)[1]["tags"]}
    assert tags == {"music": 1, "practice": 1}
    assert world.plaza("DELETE", path, token=alice)[1]["status"] == "withdrawn"
    assert world.plaza("GET", path, token=bob)[0] == 404
    assert world.plaza("GET", path, token=alice)[0] == 200  # the author still sees it
    assert world.plaza("GET", "/plans", token=bob)[1]["plans"] == []
    assert world.plaza("GET", "/tags", token=bob)[1]["tags"] == []
    assert world.plaza("PUT", f"{path}/like", token=bob)[0] == 404
    assert types(world) == ["plan.published", "plan.updated", "plan.withdrawn"]


def test_an_import_copies_once_per_user_and_counts(world: PlazaWorld) -> None:
    alice, bob = world.token("alice"), world.token("bob")
    plan = world.publish(
        alice,
        "Sourdough",
        steps=[{"title": "Feed the starter"}, {"title": "Bake", "duration_minutes": 45}],
    )
    path = f"/plans/{plan['plan_id']}/import"
    status, first = world.plaza("POST", path, token=bob)
    assert status == 201 and first["created"] is True
    copy = first["copy"]
    assert (copy["author_id"], copy["status"], copy["imported_from"]) == (
        "bob", "private", plan["plan_id"])  # fmt: skip
    assert [s["title"] for s in copy["steps"]] == ["Feed the starter", "Bake"]
    status, again = world.plaza("POST", path, token=bob)
    assert (status, again["created"], again["copy"]["plan_id"]) == (200, False, copy["plan_id"])
    assert world.plaza("POST", path, token=alice)[0] == 201  # one's own plan too (no reward)
    seen = world.plaza("GET", f"/plans/{plan['plan_id']}", token=bob)[1]
    assert (seen["import_count"], seen["imported"]) == (2, True)
    assert world.plaza("GET", f"/plans/{copy['plan_id']}", token=alice)[0] == 404  # bob's own
    mine = world.plaza("GET", "/me/plans", token=bob)[1]["plans"]
    assert [p["plan_id"] for p in mine] == [copy["plan_id"]]
    imports = [e for e in world.plaza_events() if e.type == "plan.imported"]
    assert [(e.event_id, e.actor_id, e.author_id) for e in imports] == [
        (import_event_id(plan["plan_id"], "bob"), "bob", "alice"),
        (import_event_id(plan["plan_id"], "alice"), "alice", "alice")]  # fmt: skip


def test_concurrent_likes_and_unlikes_keep_exact_counts(world: PlazaWorld) -> None:
    plan = world.publish(world.token("alice"), "Popular plan")
    path = f"/plans/{plan['plan_id']}/like"
    users = [world.token(f"fan-{n}") for n in range(30)]
    # Every user likes twice at once, then the first ten unlike twice at once.
    likes = [(token, "PUT") for token in users for _ in range(2)]
    unlikes = [(token, "DELETE") for token in users[:10] for _ in range(2)]
    with ThreadPoolExecutor(16) as pool:
        for batch in (likes, unlikes):
            answers = pool.map(lambda a: world.plaza(a[1], path, token=a[0]), batch)
            assert {status for status, _ in answers} == {200}
    seen = world.plaza("GET", f"/plans/{plan['plan_id']}", token=users[0])[1]
    assert (seen["like_count"], seen["liked"]) == (20, False)
    assert world.plaza("GET", f"/plans/{plan['plan_id']}", token=users[-1])[1]["liked"] is True
    assert Counter(types(world)) == {"plan.published": 1, "plan.liked": 30, "plan.unliked": 10}


def comment(world: PlazaWorld, token: str, plan_id: str, body: str,
            parent: int | None = None) -> dict[str, Any]:  # fmt: skip
    status, made = world.plaza("POST", f"/plans/{plan_id}/comments", token=token,
                               body={"body": body, "parent_id": parent})  # fmt: skip
    assert status == 201, made
    return dict(made)


def test_a_thread_is_a_tree_paged_depth_first_with_soft_deletes(world: PlazaWorld) -> None:
    alice, bob = world.token("alice"), world.token("bob")
    plan_id = world.publish(alice, "Discuss me")["plan_id"]
    a = comment(world, alice, plan_id, "first")
    b = comment(world, bob, plan_id, "second")
    a1 = comment(world, bob, plan_id, "reply to first", a["comment_id"])
    a11 = comment(world, alice, plan_id, "reply to the reply", a1["comment_id"])
    a111 = comment(world, bob, plan_id, "three levels deep", a11["comment_id"])
    a2 = comment(world, alice, plan_id, "second reply to first", a["comment_id"])
    expected = [
        (a["comment_id"], 0),
        (a1["comment_id"], 1),
        (a11["comment_id"], 2),
        (a111["comment_id"], 3),
        (a2["comment_id"], 1),
        (b["comment_id"], 0),
    ]
    seen, cursor = [], None
    while True:  # pages of two, by keyset
        query = f"?limit=2&cursor={cursor}" if cursor else "?limit=2"
        status, page = world.plaza("GET", f"/plans/{plan_id}/comments{query}", token=bob)
        assert status == 200
        seen += [(c["comment_id"], c["depth"]) for c in page["comments"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == expected
    status, body = world.plaza("DELETE", f"/comments/{a1['comment_id']}", token=alice)
    assert (status, body["error"]["code"]) == (403, "not_author")
    status, gone = world.plaza("DELETE", f"/comments/{a1['comment_id']}", token=bob)
    assert status == 200 and (gone["deleted"], gone["body"]) == (True, None)
    assert world.plaza("DELETE", f"/comments/{a1['comment_id']}", token=bob)[0] == 200  # again
    thread = world.plaza("GET", f"/plans/{plan_id}?comments=50", token=alice)[1]["comments"]
    assert [(c["comment_id"], c["depth"]) for c in thread["items"]] == expected
    assert [c["deleted"] for c in thread["items"]] == [False, True, False, False, False, False]
    # A reply to a deleted comment is still a reply; to another plan's comment it is not.
    comment(world, alice, plan_id, "reply to a deleted comment", a1["comment_id"])
    other = world.publish(alice, "Other plan")["plan_id"]
    status, body = world.plaza("POST", f"/plans/{other}/comments", token=alice,
                               body={"body": "x", "parent_id": a["comment_id"]})  # fmt: skip
    assert (status, body["error"]["code"]) == (404, "comment_not_found")
    counted = Counter(types(world))
    assert (counted["comment.posted"], counted["comment.deleted"]) == (7, 1)


def test_search_finds_chinese_and_english_and_pages_by_keyset(world: PlazaWorld) -> None:
    alice, bob = world.token("alice"), world.token("bob")
    zh = world.publish(alice, "我的学习计划", summary="每天阅读一小时", tags=["学习"],
                       steps=[{"title": "背单词", "detail": "用卡片复习"}])  # fmt: skip
    long_runs = [{"title": "Long runs", "detail": "Sunday"}]
    en = world.publish(alice, "Marathon training", summary="Sixteen weeks to race day",
                       tags=["running"], steps=long_runs)  # fmt: skip
    mixed = world.publish(bob, "Python 学习", tags=["python", "学习"])

    def found(query: str, **extra: str) -> list[str]:
        from urllib.parse import urlencode

        status, page = world.plaza("GET", "/plans?" + urlencode({"q": query, **extra}),
                                   token=bob)  # fmt: skip
        assert status == 200, page
        return [p["plan_id"] for p in page["plans"]]

    assert found("学习") == [mixed["plan_id"], zh["plan_id"]]
    assert found("学习计划") == [zh["plan_id"]]
    assert found("计学") == []  # the characters, not in this order
    assert found("单词") == [zh["plan_id"]]  # a step's title
    assert found("复习") == [zh["plan_id"]]  # a step's detail
    assert found("阅") == [zh["plan_id"]]
    assert found("MARATH") == [en["plan_id"]]  # words by prefix, any case
    assert found("sunday race") == [en["plan_id"]]
    assert found("python 学习") == [mixed["plan_id"]]
    assert found("学习", tag="python") == [mixed["plan_id"]]
    assert found("  !!  ") == []
    assert found("'; DROP TABLE plaza_plans; --") == []

    more = [world.publish(alice, f"Plan {n}", tags=["bulk"])["plan_id"] for n in range(7)]
    world.plaza("PUT", f"/plans/{more[2]}/like", token=bob)
    world.plaza("POST", f"/plans/{more[5]}/import", token=bob)
    world.plaza("PUT", f"/plans/{more[5]}/like", token=bob)
    for sort, tag in (("newest", "bulk"), ("newest", None), ("popular", "bulk")):
        ids, cursor = [], None
        while True:
            query = f"/plans?sort={sort}&limit=3" + (f"&tag={tag}" if tag else "") + (
                f"&cursor={cursor}" if cursor else "")  # fmt: skip
            page = world.plaza("GET", query, token=bob)[1]
            ids += [p["plan_id"] for p in page["plans"]]
            cursor = page["next_cursor"]
            if cursor is None:
                break
        if sort == "popular":
            assert ids[:2] == [more[5], more[2]] and sorted(ids) == sorted(more)
        elif tag:
            assert ids == more[::-1]
        else:
            assert ids == [*more[::-1], mixed["plan_id"], en["plan_id"], zh["plan_id"]]


@pytest.mark.parametrize(("body", "field"), [
    ({"title": "", "steps": [{"title": "x"}]}, "title"),
    ({"title": "x" * 201, "steps": [{"title": "x"}]}, "title"),
    ({"title": "t\x00", "steps": [{"title": "x"}]}, "title"),
    ({"title": "t", "steps": []}, "steps"),
    ({"title": "t", "steps": [{"title": "x", "duration_minutes": 0}]}, "steps"),
    ({"title": "t", "steps": [{"title": "x"}] * 51}, "steps"),
    ({"title": "t", "steps": [{"title": "x"}], "surprise": 1}, "surprise"),
    ({"title": "t", "steps": [{"title": "x"}], "tags": ["a" * 33]}, "invalid_tag"),
    ({"title": "t", "steps": [{"title": "x"}], "tags": [f"t{n}" for n in range(9)]},
     "too_many_tags"),
])  # fmt: skip
def test_bad_input_is_a_precise_4xx(world: PlazaWorld, body: dict[str, Any], field: str) -> None:
    status, answer = world.plaza("POST", "/plans", token=world.token("alice"), body=body)
    assert status == 422, answer
    assert field in answer["error"]["code"] + answer["error"]["message"]


def test_the_other_refusals(world: PlazaWorld) -> None:
    alice = world.token("alice")
    assert world.plaza("GET", "/plans")[1]["error"]["code"] == "missing_token"
    assert world.plaza("GET", "/plans", token=alice + "x")[0] == 401
    assert world.plaza("GET", "/plans/p_000000000000000000000000", token=alice)[0] == 404
    assert world.plaza("GET", "/plans/not-a-plan", token=alice)[0] == 422
    status, body = world.plaza("GET", "/plans?cursor=garbage", token=alice)
    assert (status, body["error"]["code"]) == (422, "invalid_cursor")
    assert world.plaza("GET", "/plans?limit=51", token=alice)[0] == 422
    assert world.plaza("GET", "/plans?sort=oldest", token=alice)[0] == 422
    huge = {"title": "t", "summary": "x" * 300_000, "steps": [{"title": "x"}]}
    assert world.plaza("POST", "/plans", token=alice, body=huge)[0] == 413
    assert world.plaza("DELETE", "/comments/99999999", token=alice)[0] == 404
    plan_id = world.publish(alice, "<script>alert(1)</script>")["plan_id"]
    shown = world.plaza("GET", f"/plans/{plan_id}", token=alice)[1]
    assert shown["title"] == "<script>alert(1)</script>"  # stored as typed, shown as text
