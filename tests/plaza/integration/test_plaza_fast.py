"""The plaza's fast path (plaza/fast.py) and its batched reads (plaza/reads.py).

Both must change speed, never behaviour:

- two real plaza processes on the same data, one with ``plaza.fast_reads`` off, answer
  every list, detail and like request (good ones and bad ones) with the same status,
  content type and bytes;
- in-process, the fast path answers well-formed requests itself and hands every other
  one to the app behind it untouched;
- pages and details read together in one batch are, for each request, exactly what the
  same request gets when it is read alone.
"""

from __future__ import annotations

import asyncio
import json
import urllib.parse
from collections import defaultdict
from collections.abc import Awaitable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple

import pytest
from pydantic import SecretStr

from contracts.cloudevents import trace_id
from kernel.db import connect
from kernel.errors import Refused
from kernel.settings import Settings
from plaza.api import PREFIX, PlazaService
from plaza.fast import FastPath
from plaza.reads import PlazaReads
from plaza.repository import Listing, Page, Row
from testbed.asgi import HANDED_ON, Downstream, http_scope, status_of
from testbed.plaza import PlazaWorld, plaza_world
from testbed.proxy import free_port
from testbed.store import TOKEN_SECRET
from testbed.topics import ScratchTopics

USERS = ("alice", "bob", "carol")


class Seeded(NamedTuple):
    world: PlazaWorld
    ids: list[str]  # the plans, in the order published


@pytest.fixture
def seeded(stack_settings: Settings, scratch: ScratchTopics, unique: str) -> Iterator[Seeded]:
    """Plans in English and Chinese under a few tags, one withdrawn, likes, an import, and
    a thread longer than its first page."""
    with plaza_world(stack_settings, scratch, unique, start=False) as world:
        world.start_plaza("plaza-setup")
        tokens = {user: world.token(user) for user in USERS}
        plans = []
        for n in range(7):
            author = USERS[n % 2]
            title = f"Morning run week {n}" if n % 2 else f"周末徒步 计划 {n}"
            tags = [["running"], ["徒步", "outdoors"], ["running", "outdoors"]][n % 3]
            plans.append(world.publish(tokens[author], title, summary=f"plan <b>{n}</b>",
                                       tags=tags))  # fmt: skip
        ids = [plan["plan_id"] for plan in plans]
        for n, user in enumerate(("bob", "carol", "carol", "alice")):
            assert world.plaza("PUT", f"/plans/{ids[n]}/like", token=tokens[user])[0] == 200
        assert world.plaza("POST", f"/plans/{ids[0]}/import", token=tokens["carol"])[0] == 201
        assert world.plaza("DELETE", f"/plans/{ids[6]}", token=tokens["alice"])[0] == 200
        parent = None
        for n in range(25):
            body = {"body": f"comment <i>{n}</i>", "parent_id": parent}
            status, made = world.plaza("POST", f"/plans/{ids[1]}/comments",
                                       token=tokens[USERS[n % 3]], body=body)  # fmt: skip
            assert status == 201, made
            parent = made["comment_id"] if n % 4 else None
        world.stop("plaza-setup")
        yield Seeded(world, ids)


def service_settings(world: PlazaWorld) -> Settings:
    """The world's settings as its plaza processes have them (its secret, its topic)."""
    settings = world.env_settings()
    return settings.model_copy(update={
        "store": settings.store.model_copy(update={"token_secret": SecretStr(TOKEN_SECRET)}),
        "plaza": settings.plaza.model_copy(update={"topic": world.plaza_topic}),
    })  # fmt: skip


def page_cursor(world: PlazaWorld, base: str, query: str, token: str) -> str:
    status, _, body = world.raw("GET", f"/plans?{query}", token=token, base=base)
    assert status == 200, body
    cursor = json.loads(body)["next_cursor"]
    assert cursor, f"{query} has a second page"
    return str(cursor)


def list_paths(world: PlazaWorld, base: str, token: str) -> list[str]:
    newest = page_cursor(world, base, "limit=2", token)
    popular = page_cursor(world, base, "limit=2&sort=popular", token)
    tagged = page_cursor(world, base, "limit=1&tag=running", token)
    zh = urllib.parse.quote("徒步")
    return [
        "/plans", "/plans?limit=2", f"/plans?limit=2&cursor={newest}", "/plans?sort=popular",
        f"/plans?sort=popular&limit=2&cursor={popular}", f"/plans?sort=newest&cursor={popular}",
        "/plans?tag=running", f"/plans?tag=running&limit=1&cursor={tagged}",
        "/plans?tag=%20RUNNING%20", f"/plans?tag={zh}", f"/plans?tag={zh}&sort=popular",
        "/plans?q=morning", "/plans?q=morn&sort=popular", f"/plans?q={zh}",
        f"/plans?q={zh}&tag=outdoors", "/plans?q=%21%21", "/plans?q=", "/plans?tag=",
        "/plans?sort=oldest", "/plans?limit=0", "/plans?limit=51", "/plans?limit=abc",
        "/plans?limit=020", "/plans?limit=-1", "/plans?limit=%C2%B2", "/plans?cursor=bogus",
        "/plans?cursor=", f"/plans?cursor={'1' * 701}", f"/plans?tag={'t' * 201}",
        f"/plans?q={'q' * 201}", "/plans?tag=a&tag=b", "/plans?extra=1", "/plans?q=%ZZ",
        f"/plans?tag={'t' * 60}",
    ]  # fmt: skip


def detail_paths(ids: list[str]) -> list[str]:
    return [
        f"/plans/{ids[1]}", f"/plans/{ids[1]}?comments=5", f"/plans/{ids[1]}?comments=50",
        f"/plans/{ids[0]}?comments=1", f"/plans/{ids[6]}", f"/plans/p_{'0' * 24}",
        f"/plans/{ids[1]}?comments=0", f"/plans/{ids[1]}?comments=51",
        f"/plans/{ids[1]}?comments=x", f"/plans/{ids[1]}?comments=1&comments=2",
        f"/plans/{ids[1]}?other=1", f"/plans/{ids[1].upper()}", "/plans/p_123",
    ]  # fmt: skip


def test_fast_path_answers_byte_for_byte_as_the_routes(seeded: Seeded) -> None:
    world, ids = seeded
    routes_url = world.start_plaza("plaza-routes", free_port(), fast_reads="false")
    fast_url = world.start_plaza("plaza-fast", free_port(), fast_reads="true")
    good = {user: world.token(user) for user in USERS}
    payload, mac = good["alice"].split(".")
    tokens: list[str | None] = [
        *good.values(), None, world.token("alice", ttl_s=-1), "not-a-token",
        payload + "." + mac[:-2] + ("AA" if mac[-2:] != "AA" else "BB"),
    ]  # fmt: skip
    paths = list_paths(world, routes_url, good["alice"]) + detail_paths(ids)
    compared = 0
    for token in tokens:
        for path in paths:
            routes = world.raw("GET", path, token=token, base=routes_url)
            fast = world.raw("GET", path, token=token, base=fast_url)
            assert fast == routes, (path, token, fast, routes)
            compared += 1
    assert compared == len(tokens) * len(paths)
    # A like changes state: each (user, plan) is liked through one process, then again
    # through the other, which is a repeat; both answers must be the same bytes.
    likes = [f"/plans/{ids[n]}/like" for n in (0, 2, 3)]
    for n, token in enumerate(tokens):
        for path in [*likes, f"/plans/{ids[6]}/like", f"/plans/p_{'0' * 24}/like",
                     "/plans/p_1/like", f"/plans/{ids[4]}/like?x=1"]:  # fmt: skip
            first, second = (routes_url, fast_url) if n % 2 else (fast_url, routes_url)
            answers = [world.raw("PUT", path, token=token, base=base) for base in (first, second)]
            assert answers[0] == answers[1], (path, token, answers)
    # And the data is really there: the comparison is not between empty answers.
    status, _, body = world.raw("GET", f"/plans/{ids[1]}?comments=5", token=good["bob"],
                                base=fast_url)  # fmt: skip
    detail = json.loads(body)
    assert status == 200
    assert len(detail["comments"]["items"]) == 5
    assert detail["comments"]["next_cursor"]
    status, _, body = world.raw("GET", "/plans?sort=popular", token=good["bob"], base=fast_url)
    listed = json.loads(body)["plans"]
    assert len(listed) == 6
    assert any(plan["liked"] for plan in listed)


def test_likes_made_together_count_once_each_with_their_own_event(seeded: Seeded) -> None:
    """Forty users like three plans at once through the fast path, each twice, so likes
    are made in batches, repeats among them: every count is exact, every new like has one
    ``plan.liked`` event carrying the trace of the request that made it, and a like of a
    withdrawn plan is still the route's 404."""
    world, ids = seeded
    fast_url = world.start_plaza("plaza-fast", free_port(), fast_reads="true")
    plans = [ids[4], ids[5], ids[6]]  # nobody liked them yet; the last is withdrawn
    users = [f"liker-{n:02d}" for n in range(40)]
    tokens = {user: world.token(user) for user in users}
    before = {event.event_id for event in world.plaza_events()}

    def like(job: tuple[int, str, str]) -> tuple[str, str, str, int, Any]:
        n, user, plan_id = job
        trace = f"00-{n + 1:032x}-{n + 1:016x}-01"  # (all-zero ids are not a trace)
        status, _, body = world.raw("PUT", f"/plans/{plan_id}/like", token=tokens[user],
                                    headers={"traceparent": trace}, base=fast_url)  # fmt: skip
        return user, plan_id, trace, status, json.loads(body)

    jobs = [(n, user, plan_id) for n, (user, plan_id) in enumerate(
        (user, plan_id) for _ in range(2) for user in users for plan_id in plans)]  # fmt: skip
    with ThreadPoolExecutor(max_workers=32) as pool:
        answers = list(pool.map(like, jobs))
    for _, plan_id, _, status, body in answers:
        if plan_id == ids[6]:
            assert (status, body["error"]["code"]) == (404, "plan_not_found"), body
        else:
            assert status == 200, body
            assert body["plan_id"] == plan_id
            assert body["liked"] is True
            assert 1 <= body["like_count"] <= len(users)
    for plan_id in plans[:2]:
        status, _, body = world.raw("GET", f"/plans/{plan_id}", token=tokens[users[0]],
                                    base=fast_url)  # fmt: skip
        assert json.loads(body)["like_count"] == len(users)
    events = [e for e in world.plaza_events() if e.event_id not in before]
    assert sorted((e.type, e.actor_id, e.plan_id) for e in events) == sorted(
        ("plan.liked", user, plan_id) for user in users for plan_id in plans[:2])  # fmt: skip
    with connect(world.env_settings()) as conn:
        rows = conn.execute("SELECT event_id, headers FROM outbox WHERE topic = %s",
                            (world.plaza_topic,)).fetchall()  # fmt: skip
    headers = dict(rows)
    asked: dict[tuple[str, str], set[str]] = defaultdict(set)  # the traces of its requests
    for user, plan_id, trace, _, _ in answers:
        asked[(user, plan_id)].add(trace_id(trace))
    for event in events:
        trace = trace_id(headers[event.event_id]["traceparent"])
        assert trace in asked[(event.actor_id, event.plan_id)], event


def scope(path: str, query: str = "", token: str | None = None,
          method: str = "GET") -> dict[str, Any]:  # fmt: skip
    return http_scope(PREFIX + path, query, token, method)


def test_the_fast_path_answers_good_requests_and_hands_on_the_rest(seeded: Seeded) -> None:
    world, ids = seeded
    token = world.token("carol")

    async def run() -> None:
        service = PlazaService(service_settings(world))
        await service.start()
        downstream = Downstream()
        app = FastPath(downstream, service.reads, service.likes, service.secret, PREFIX,
                       service.settings.plaza.max_tag_chars)  # fmt: skip
        try:
            answered = [
                scope("/plans", token=token),
                scope("/plans", "sort=popular&tag=running&limit=3", token),
                scope("/plans", "q=morning", token),
                scope(f"/plans/{ids[1]}", "comments=3", token),
                scope(f"/plans/{ids[5]}/like", token=token, method="PUT"),
            ]
            for request in answered:
                assert await status_of(app, request) == 200, request
            assert downstream.paths == []
            handed_on = [
                scope("/plans"),  # no token
                scope("/plans", token=token + "x"),  # tampered
                scope("/plans", token=token, method="POST"),  # publishing is the route's
                scope("/plans", "limit=0", token),
                scope("/plans", "cursor=bogus", token),  # the route words the 422
                scope("/plans", "sort=best", token),
                scope(f"/plans/{ids[6]}", token=token),  # withdrawn: the route's 404
                scope(f"/plans/p_{'0' * 24}", token=token),
                scope(f"/plans/{ids[1]}/comments", token=token),  # not a fast route
                scope(f"/plans/{ids[5]}/like", token=token, method="DELETE"),
                scope(f"/plans/{ids[6]}/like", token=token, method="PUT"),
                scope("/tags", token=token),
            ]
            for request in handed_on:
                assert await status_of(app, request) == HANDED_ON, request
            assert len(downstream.paths) == len(handed_on)
        finally:
            await service.stop()

    asyncio.run(run())


@pytest.mark.parametrize("window", [1000, 3])
def test_reads_in_one_batch_equal_the_routes_reads(
    seeded: Seeded, window: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Forty lists and details at once through the batching reader (so batches form: one
    query of each kind at a time, the rest waiting) against the same requests one by one
    through the repository, which the routes answer with. Searches are read over a
    window of their order first: with a window of 3 plans some fill their page there and
    some must be asked again."""
    monkeypatch.setattr("plaza.repository.SEARCH_WINDOW", window)
    world, ids = seeded

    async def run() -> None:
        service = PlazaService(service_settings(world))
        await service.start()
        batched = PlazaReads(service.repo, batch_max=16, batch_queries=1)
        repo = service.repo
        try:
            first = await repo.listing("bob", Listing("newest", None, None, None, 2))
            popular = await repo.listing("bob", Listing("popular", None, None, None, 2))
            asks = [
                Listing("newest", None, None, None, 20), Listing("newest", None, None, None, 1),
                Listing("newest", None, None, first.next_cursor, 2),
                Listing("popular", None, None, popular.next_cursor, 3),
                Listing("popular", "running", None, None, 20),
                Listing("newest", "running", None, None, 2),
                Listing("newest", "徒步", None, None, 5),
                Listing("newest", None, "morning", None, 20),
                Listing("popular", "outdoors", "徒步", None, 20),
                Listing("newest", None, "nothing-matches", None, 20),
                Listing("newest", None, "morning", None, 1),
                Listing("popular", None, "morning", None, 1),
                Listing("newest", None, "周末", None, 1),
                Listing("newest", None, "morning", first.next_cursor, 1),
            ]  # fmt: skip
            details = [(ids[n % 7], n % 20) for n in range(10)]
            viewers = (*USERS, "dave")
            expected: list[Page | Row | Refused] = [
                await repo.listing(user, ask) for user in viewers for ask in asks
            ]
            for user in viewers:
                expected += [await _detail(repo.plan(p, user, comments=c)) for p, c in details]
            # Twice: the second time, the terms the first found rare skip their window.
            for _ in range(2):
                together = await asyncio.gather(
                    *(batched.listing(user, ask) for user in viewers for ask in asks),
                    *(_detail(batched.plan(p, user, c)) for user in viewers for p, c in details),
                )
                assert len(together) == len(expected)
                for got, want in zip(together, expected, strict=True):
                    assert _plain(got) == _plain(want)
            assert batched.rare, "some search did not fill its page in the window"
            assert any(isinstance(x, Page) and len(x.items) > 1 for x in together)
            assert any(isinstance(x, Page) and x.next_cursor for x in together)
            assert any(isinstance(x, dict) and x.get("comments") for x in together)
            assert any(isinstance(x, Refused) for x in together), "a withdrawn plan's 404"
            flags = [(p["liked"], p["imported"]) for x in together if isinstance(x, Page)
                     for p in x.items]  # fmt: skip
            assert (True, False) in flags
            assert (False, True) in flags
        finally:
            await service.stop()

    asyncio.run(run())


async def _detail(read: Awaitable[Row]) -> Row | Refused:
    try:
        return await read
    except Refused as refused:
        return refused


def _plain(value: Any) -> Any:
    if isinstance(value, Page):
        return ("page", value.items, value.next_cursor)
    if isinstance(value, Refused):
        return ("refused", type(value).__name__, str(value))
    return value
