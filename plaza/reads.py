"""The plaza's hot reads, batched: the list and a plan's detail under a crowd.

Most of the plaza's traffic asks the same few things (the newest plans, a popular tag, a
plan someone linked), each a query whose fixed cost is most of its price. With a
:class:`kernel.batching.Batcher` the requests that wait together are answered by one set
of queries: one per distinct page asked for (a hundred viewers of the newest plans share
one), and one for all the viewers' likes and imports among the plans shown. A batch is
fetched only after its requests arrived, so a reply is as fresh as a query of its own:
whoever just liked a plan sees the like. A lone request is fetched at once, alone.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

from psycopg import AsyncConnection, AsyncCursor
from psycopg.rows import dict_row

from kernel.batching import Batcher
from kernel.errors import PlazaNotFound, Refused
from plaza import domain
from plaza.repository import (
    COLUMNS,
    COMMENT,
    ONE_ASK,
    PLANS,
    Listing,
    ListQuery,
    Page,
    PlazaRepository,
    Row,
    listing_sql,
    shown_comment,
)

RARE_FOR_S = 60.0  # how long a term found rare goes straight to its matching plans
RARE_TERMS_MAX = 10_000
ListKey = tuple[str, Listing, ListQuery]  # (viewer, the page asked for, its query)
DetailKey = tuple[str, str, int]  # (plan, viewer, first comments)

FLAGS = (
    "SELECT user_id, plan_id, 'liked' AS flag FROM plaza_likes WHERE user_id = ANY(%(users)s) "
    "AND plan_id = ANY(%(plans)s) UNION ALL SELECT user_id, plan_id, 'imported' FROM "
    "plaza_imports WHERE user_id = ANY(%(users)s) AND plan_id = ANY(%(plans)s)"
)
# The pages of one shape (plaza.repository.ListQuery) for many asks in one statement: each
# ask a row of parameters, its page a lateral subquery over that row.
PAGES = (
    "SELECT a.n, x.* FROM unnest(%s::int[], %s::text[], %s::text[], %s::timestamptz[], "
    "%s::bigint[], %s::text[], %s::int[]) AS a(n, tag, terms, after_ts, after_n, after_id, "
    "lim) CROSS JOIN LATERAL ({shape}) x"
)
# One ask alone, its parameters known to the planner. A search's best plan depends on how
# many plans match its terms (few: the search's GIN index; many: the order's index,
# filtered), and one plan for many asks (PAGES) must be one for all: walking the order's
# index, which for common words costs a third of a query each (12 searches: 1.7 ms
# against 5.4 ms one by one), but for a rare word walks the whole index. So searches are
# read together over a bounded window of the order (ListQuery.windowed), and only those
# that did not fill their page there are asked again here, alone.
ONE_PAGE = "SELECT x.* FROM " + ONE_ASK + " CROSS JOIN LATERAL ({shape}) x"
FIRST_COMMENTS = (
    f"SELECT c.* FROM unnest(%s::text[], %s::int[]) AS a(plan, n) CROSS JOIN LATERAL (SELECT "
    f"{COMMENT} FROM plaza_comments WHERE plan_id = a.plan ORDER BY path LIMIT a.n + 1) c"
)


class PlazaReads:
    def __init__(self, repo: PlazaRepository, *, batch_max: int, batch_queries: int) -> None:
        self.repo = repo
        limits = {"max_batch": batch_max, "max_running": batch_queries}
        self._lists = Batcher[ListKey, Page](self._fetch_lists, **limits)
        self._details = Batcher[DetailKey, "Row | Refused"](self._fetch_details, **limits)
        # Search terms whose first page the window did not fill lately (term -> when): their
        # next searches go straight to the matching plans. Only a speed-up: either way the
        # page is exact.
        self.rare: dict[str, float] = {}

    async def listing(self, viewer: str, ask: Listing) -> Page:
        """A page of published plans as ``viewer`` sees them (see :func:`listing_sql`)."""
        query = listing_sql(ask)  # also checks the cursor: its error is this request's
        if query is None:
            return Page([], None)
        return await self._lists.get((viewer, ask, query))

    async def plan(self, plan_id: str, viewer: str, comments: int) -> Row:
        """A plan with its steps and its first ``comments`` comments, as ``viewer`` sees it."""
        found = await self._details.get((plan_id, viewer, comments))
        if isinstance(found, Refused):
            raise found
        return found

    async def _fetch_lists(self, keys: list[ListKey]) -> list[Page]:
        shapes: dict[str, Group] = defaultdict(list)
        for ask, query in dict.fromkeys((ask, query) for _, ask, query in keys):
            shapes[query.shape].append((ask, query))
        async with self.repo.pool.connection() as conn:
            pages, short = await _read_pages(conn, shapes, self._is_rare)
            cursor = conn.cursor(row_factory=dict_row, binary=True)
            plans = {row["plan_id"] for rows in pages.values() for row in rows}
            flags = await _flags(cursor, {viewer for viewer, _, _ in keys}, plans)
        result = []
        for viewer, ask, _ in keys:
            ordered = sorted(pages[ask], key=_sort_key(ask), reverse=True)
            rows = [_with_flags(row, viewer, flags) for row in ordered[: ask.limit]]
            more = len(ordered) > ask.limit
            result.append(Page(rows, domain.list_cursor(ask.sort, rows[-1]) if more else None))
        self._note_rare(short)
        return result

    def _is_rare(self, query: ListQuery) -> bool:
        noted = self.rare.get(query.params()["terms"])
        return noted is not None and time.monotonic() - noted < RARE_FOR_S

    def _note_rare(self, short: Group) -> None:
        """Terms whose first page the window did not fill: few plans match them."""
        now = time.monotonic()
        for ask, query in short:
            if ask.cursor is None:
                if len(self.rare) >= RARE_TERMS_MAX:
                    self.rare.clear()  # bounded: the next batches find them again
                self.rare[query.params()["terms"]] = now

    async def _fetch_details(self, keys: list[DetailKey]) -> list[Row | Refused]:
        wanted: dict[str, int] = {}
        for plan_id, _, comments in keys:
            wanted[plan_id] = max(wanted.get(plan_id, 0), comments)
        async with self.repo.pool.connection() as conn:
            cursor = conn.cursor(row_factory=dict_row, binary=True)
            await cursor.execute(f"SELECT {COLUMNS}, p.steps FROM {PLANS} WHERE "
                                 "p.plan_id = ANY(%s)", (list(wanted),))  # fmt: skip
            plans = {row["plan_id"]: row for row in await cursor.fetchall()}
            flags = await _flags(cursor, {viewer for _, viewer, _ in keys}, set(plans))
            threads: dict[str, list[Row]] = defaultdict(list)
            asked = [(p, n) for p, n in wanted.items() if p in plans and n > 0]
            if asked:
                await cursor.execute(FIRST_COMMENTS, ([p for p, _ in asked], [n for _, n in asked]))
                for row in await cursor.fetchall():
                    threads[row["plan_id"]].append(row)
        return [_detail(plans.get(plan_id), plan_id, viewer, flags, threads[plan_id], comments)
                for plan_id, viewer, comments in keys]  # fmt: skip


Flags = dict[tuple[str, str], set[str]]
Group = list[tuple[Listing, ListQuery]]  # the asks of one shape


async def _read_pages(conn: AsyncConnection[Any], shapes: dict[str, Group],
                      rare: Callable[[ListQuery], bool]
                      ) -> tuple[dict[Listing, list[Row]], Group]:  # fmt: skip
    """Every page of a batch: one statement per shape for all its asks, all of them in one
    round trip (a pipeline). Searches are read over their window of the page's order
    (``ListQuery.windowed``); a search that did not fill its page there is asked again,
    alone, from the plans that match it (``ListQuery.matched``: a rare word, or the end of
    the results), and so is at once a search whose terms are ``rare``. Returns the pages,
    and the searches asked from their matching plans."""
    pages: dict[Listing, list[Row]] = {ask: [] for group in shapes.values() for ask, _ in group}
    sent: list[tuple[Group, AsyncCursor[Row]]] = []
    direct = [(ask, query) for group in shapes.values() for ask, query in group
              if query.windowed and rare(query)]  # fmt: skip
    skipped = {ask for ask, _ in direct}
    async with conn.pipeline():
        for shape, every in shapes.items():
            group = [(ask, query) for ask, query in every if ask not in skipped]
            if not group:
                continue
            columns = list(zip(*(query.values for _, query in group), strict=True))
            cursor = conn.cursor(row_factory=dict_row, binary=True)
            await cursor.execute(PAGES.format(shape=group[0][1].windowed or shape),
                                 [list(range(len(group))), *map(list, columns)])  # fmt: skip
            sent.append((group, cursor))
    for group, cursor in sent:
        for row in await cursor.fetchall():
            pages[group[row.pop("n")][0]].append(row)
    short = direct + [(ask, query) for group in shapes.values() for ask, query in group
                      if query.windowed and ask not in skipped
                      and len(pages[ask]) < query.params()["lim"]]  # fmt: skip
    if short:
        exact: list[tuple[Listing, AsyncCursor[Row]]] = []
        async with conn.pipeline():
            for ask, query in short:
                cursor = conn.cursor(row_factory=dict_row, binary=True)
                await cursor.execute(ONE_PAGE.format(shape=query.matched), query.params())
                exact.append((ask, cursor))
        for ask, cursor in exact:
            pages[ask] = await cursor.fetchall()
    return pages, short


async def _flags(cursor: Any, viewers: set[str], plans: set[str]) -> Flags:
    """Which of ``plans`` each viewer liked and imported: {(viewer, plan): {"liked", ...}}."""
    flags: Flags = defaultdict(set)
    if plans:
        await cursor.execute(FLAGS, {"users": sorted(viewers), "plans": sorted(plans)})
        for row in await cursor.fetchall():
            flags[(row["user_id"], row["plan_id"])].add(row["flag"])
    return flags


def _sort_key(ask: Listing) -> Any:
    """The page's order (a lateral subquery's rows keep it, but SQL does not promise so)."""
    if ask.sort == "newest":
        return lambda row: (row["created_at"], row["plan_id"])
    return lambda row: (row["popularity"], row["plan_id"])


def _with_flags(row: Row, viewer: str, flags: Flags) -> Row:
    mine = flags.get((viewer, row["plan_id"]), ())
    return {**row, "liked": "liked" in mine, "imported": "imported" in mine}


def _detail(row: Row | None, plan_id: str, viewer: str, flags: Flags, thread: list[Row],
            comments: int) -> Row | Refused:  # fmt: skip
    """One request's answer: the plan as the viewer may see it, else its refusal."""
    try:
        if row is None:
            raise PlazaNotFound("plan_not_found", f"no plan {plan_id!r}")
        steps = row["steps"]
        plan = _with_flags({k: v for k, v in row.items() if k != "steps"}, viewer, flags)
        plan = domain.visible({**plan, "steps": steps}, viewer)  # the keys in the route's order
    except Refused as refused:
        return refused
    if comments:
        thread = sorted(thread, key=lambda c: c["path"])
        page = thread[:comments]
        more = len(thread) > comments
        plan["comments"] = {
            "items": [shown_comment(c) for c in page],
            "next_cursor": domain.thread_cursor(page[-1]["path"]) if more else None,
        }
    return plan
