"""The plan plaza's Postgres side: plans, tags, likes, imports, comment threads.

Every change and its event (``plaza.events``, keyed by plan id) are written in one
transaction: the change's rows, then the event into the outbox (migration 0002), which
the relay publishes. So no crash leaves a change without its event or an event without
its change. Counts are exact under concurrency: a like, an import or a comment locks its
plan's row (``FOR NO KEY UPDATE``, which does not block the foreign-key checks of
other inserts), inserts its own row (unique per user and plan for likes and imports: a
repeat inserts nothing and changes no count), and only then moves the count.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import psycopg
from psycopg import AsyncCursor
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from contracts.cloudevents import current_trace, event_headers
from contracts.plaza import PLAZA_EVENTS, PlazaEvent
from contracts.records import EPOCH
from kernel.db import open_pool
from kernel.errors import CreditLedgerError, PlazaNotFound, Refused
from kernel.settings import Settings
from outbox.enqueue import enqueue_async, enqueue_many_async
from plaza import domain
from plaza.domain import Sort
from plaza.search import tsquery, vector
from streams.codec import AvroCodec

Row = dict[str, Any]

COLUMNS = (
    "p.plan_id, p.author_id, p.title, p.summary, p.tags, p.status, p.imported_from, "
    "c.like_count, c.import_count, c.comment_count, c.popularity, p.created_at, p.updated_at"
)
# What a viewer sees of a plan: its columns and whether the viewer liked and imported it
# (plaza.reads adds the last two to a batch's rows itself, in this order).
FLAGS = (
    "EXISTS (SELECT 1 FROM plaza_likes l WHERE l.plan_id = {plan} AND l.user_id = %(viewer)s) "
    "AS liked, EXISTS (SELECT 1 FROM plaza_imports i WHERE i.plan_id = {plan} AND i.user_id = "
    "%(viewer)s) AS imported"
)
SUMMARY = f"{COLUMNS}, {FLAGS.format(plan='p.plan_id')}"
# Where COLUMNS come from: a plan and its counts.
PLANS = "plaza_plans p JOIN plaza_plan_counts c ON c.plan_id = p.plan_id"
COMMENT = (
    "comment_id, plan_id, parent_id, path, author_id, CASE WHEN deleted_at IS NULL THEN body "
    "END AS body, deleted_at IS NOT NULL AS deleted, created_at"
)


@dataclass(frozen=True)
class Page:
    items: list[Row]
    next_cursor: str | None


@dataclass(frozen=True)
class Listing:
    sort: Sort = "newest"
    tag: str | None = None
    query: str | None = None
    cursor: str | None = None
    limit: int = 20


class PlazaRepository:
    def __init__(self, settings: Settings, codec: AvroCodec, *, dsn: str | None = None) -> None:
        self.settings = settings
        self.codec = codec
        self.dsn = dsn or settings.postgres_dsn
        self._pool: AsyncConnectionPool[Any] | None = None
        plaza = settings.plaza
        self.tag_rules = domain.TagRules(plaza.default_tag, plaza.max_tags, plaza.max_tag_chars)

    async def start(self) -> None:
        self._pool = await open_pool(self.settings, dsn=self.dsn,
                                     size=self.settings.plaza.pool_size)  # fmt: skip

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    @property
    def pool(self) -> AsyncConnectionPool[Any]:
        if self._pool is None:
            raise CreditLedgerError("PlazaRepository used before start()")
        return self._pool

    async def _all(self, sql: str, params: Any = None) -> list[Row]:
        async with self.pool.connection() as conn:
            cursor = conn.cursor(row_factory=dict_row)
            await cursor.execute(sql, params)
            rows: list[Row] = await cursor.fetchall()
            return rows

    async def _emit(self, conn: psycopg.AsyncConnection[Any], event: PlazaEvent) -> None:
        """The change's event into the outbox, in the change's transaction."""
        event_id, topic, key, value, headers = self._outbox_item(event, current_trace.get())
        await enqueue_async(conn, event_id, topic, key, value, headers=headers)

    def _outbox_item(self, event: PlazaEvent, trace: str | None
                     ) -> tuple[str, str, bytes, bytes, dict[str, str]]:  # fmt: skip
        """The event as the outbox takes it: id, topic, key (the plan), Avro bytes, headers."""
        value = self.codec.encode(PLAZA_EVENTS, event.to_record())
        headers = event_headers(event.event_id, event.type, event.producer,
                                event.occurred_at_ms, trace)  # fmt: skip
        return event.event_id, self.settings.plaza.topic, event.plan_id.encode(), value, headers

    def _event(self, kind: str, plan: Row, actor: str, at: datetime, **extra: Any) -> PlazaEvent:
        return domain.event(kind, plan, actor, at, self.settings.plaza.producer_name, **extra)

    @staticmethod
    async def _locked(cursor: AsyncCursor[Row], plan_id: str) -> Row:
        await cursor.execute("SELECT plan_id, author_id, title, tags, status FROM plaza_plans "
                             "WHERE plan_id = %s FOR NO KEY UPDATE", (plan_id,))  # fmt: skip
        plan = await cursor.fetchone()
        if plan is None:
            raise PlazaNotFound("plan_not_found", f"no plan {plan_id!r}")
        return plan

    # -- plans ---------------------------------------------------------------------------------

    async def publish(self, author: str, fields: Row, raw_tags: list[str], now: datetime) -> Row:
        tags = domain.normalise_tags(raw_tags, self.tag_rules)
        plan = {**fields, "plan_id": domain.new_plan_id(), "author_id": author, "tags": tags}
        async with self.pool.connection() as conn, conn.transaction():
            cursor = conn.cursor(row_factory=dict_row)
            await cursor.execute(
                "INSERT INTO plaza_plans (plan_id, author_id, title, summary, steps, tags, "
                "status, search, created_at, updated_at) VALUES (%s, %s, %s, %s, %s, %s, "
                "'published', %s::tsvector, %s, %s)",
                (plan["plan_id"], author, plan["title"], plan["summary"], Jsonb(plan["steps"]),
                 list(tags), _search(plan), now, now),
            )  # fmt: skip
            await cursor.execute("INSERT INTO plaza_plan_counts (plan_id, published) VALUES "
                                 "(%s, true)", (plan["plan_id"],))  # fmt: skip
            await self._tag_rows(cursor, plan["plan_id"], now, tags)
            await self._emit(conn, self._event("plan.published", plan, author, now))
        return await self.plan(plan["plan_id"], author)

    async def update(self, user: str, plan_id: str, fields: Row, raw_tags: list[str],
                     now: datetime) -> Row:  # fmt: skip
        tags = domain.normalise_tags(raw_tags, self.tag_rules)
        async with self.pool.connection() as conn, conn.transaction():
            cursor = conn.cursor(row_factory=dict_row)
            plan = await self._locked(cursor, plan_id)
            domain.check_author(plan, user, "edit")
            await cursor.execute(
                "UPDATE plaza_plans SET title = %s, summary = %s, steps = %s, tags = %s, "
                "search = %s::tsvector, updated_at = %s WHERE plan_id = %s RETURNING created_at",
                (fields["title"], fields["summary"], Jsonb(fields["steps"]), list(tags),
                 _search(fields), now, plan_id),
            )  # fmt: skip
            created = await cursor.fetchone()
            assert created is not None, "the plan is locked"
            if plan["status"] == "published":
                await self._untag(cursor, plan_id)
                await self._tag_rows(cursor, plan_id, created["created_at"], tags)
            changed = {**plan, "title": fields["title"], "tags": tags}
            await self._emit(conn, self._event("plan.updated", changed, user, now))
        return await self.plan(plan_id, user)

    async def withdraw(self, user: str, plan_id: str, now: datetime) -> Row:
        async with self.pool.connection() as conn, conn.transaction():
            cursor = conn.cursor(row_factory=dict_row)
            plan = await self._locked(cursor, plan_id)
            domain.check_author(plan, user, "withdraw")
            if plan["status"] == "published":
                await self._untag(cursor, plan_id)
            await cursor.execute("UPDATE plaza_plans SET status = 'withdrawn', updated_at = %s "
                                 "WHERE plan_id = %s", (now, plan_id))  # fmt: skip
            await cursor.execute("UPDATE plaza_plan_counts SET published = false WHERE "
                                 "plan_id = %s", (plan_id,))  # fmt: skip
            await self._emit(conn, self._event("plan.withdrawn", plan, user, now))
        return await self.plan(plan_id, user)

    @staticmethod
    async def _tag_rows(cursor: AsyncCursor[Row], plan_id: str, created_at: datetime,
                        tags: tuple[str, ...]) -> None:  # fmt: skip
        await cursor.executemany("INSERT INTO plaza_plan_tags (tag, created_at, plan_id) "
                                 "VALUES (%s, %s, %s)",
                                 [(tag, created_at, plan_id) for tag in tags])  # fmt: skip
        # In sorted order: two publishes sharing tags lock their counters in the same order.
        await cursor.executemany("INSERT INTO plaza_tags (tag, plans) VALUES (%s, 1) ON "
                                 "CONFLICT (tag) DO UPDATE SET plans = plaza_tags.plans + 1",
                                 [(tag,) for tag in sorted(tags)])  # fmt: skip

    @staticmethod
    async def _untag(cursor: AsyncCursor[Row], plan_id: str) -> None:
        await cursor.execute("DELETE FROM plaza_plan_tags WHERE plan_id = %s RETURNING tag",
                             (plan_id,))  # fmt: skip
        tags = sorted(row["tag"] for row in await cursor.fetchall())
        await cursor.executemany("UPDATE plaza_tags SET plans = plans - 1 WHERE tag = %s",
                                 [(tag,) for tag in tags])  # fmt: skip

    async def plan(self, plan_id: str, viewer: str, *, comments: int = 0) -> Row:
        """One plan with its steps, as ``viewer`` sees it (and its first comments)."""
        rows = await self._all(f"SELECT {SUMMARY}, p.steps FROM {PLANS} "
                               "WHERE p.plan_id = %(plan)s", {"plan": plan_id,
                               "viewer": viewer})  # fmt: skip
        if not rows:
            raise PlazaNotFound("plan_not_found", f"no plan {plan_id!r}")
        plan = domain.visible(rows[0], viewer)
        if comments:
            page = await self.comments(plan_id, viewer, None, comments)
            plan["comments"] = {"items": page.items, "next_cursor": page.next_cursor}
        return plan

    async def listing(self, viewer: str, ask: Listing) -> Page:
        """A page of published plans, newest or most popular first, by tag and search, as
        ``viewer`` sees them: one query for the page and the viewer's flags. (The fast path
        reads pages in batches, plaza.reads; this is what the route answers with.)"""
        query = listing_sql(ask)
        if query is None:
            return Page([], None)
        key = "x.created_at" if ask.sort == "newest" else "x.popularity"
        rows = await self._all(
            f"SELECT x.*, {FLAGS.format(plan='x.plan_id')} FROM {ONE_ASK} CROSS JOIN LATERAL "
            f"({query.shape}) x ORDER BY {key} DESC, x.plan_id DESC",
            {"viewer": viewer, **query.params()},
        )
        more = len(rows) > ask.limit
        rows = rows[: ask.limit]
        return Page(rows, domain.list_cursor(ask.sort, rows[-1]) if more else None)

    async def my_plans(self, user: str, limit: int) -> list[Row]:
        return await self._all(f"SELECT {SUMMARY} FROM {PLANS} WHERE p.author_id = "
                               "%(viewer)s ORDER BY p.updated_at DESC, p.plan_id DESC "
                               "LIMIT %(limit)s", {"viewer": user, "limit": limit})  # fmt: skip

    async def tags(self, limit: int) -> list[Row]:
        return await self._all("SELECT tag, plans FROM plaza_tags WHERE plans > 0 ORDER BY "
                               "plans DESC, tag LIMIT %s", (limit,))  # fmt: skip

    # -- imports and likes ------------------------------------------------------------------

    async def import_plan(self, user: str, plan_id: str, now: datetime) -> tuple[Row, bool]:
        """Copy the plan into ``user``'s own plans, once: (the copy, whether made now)."""
        async with self.pool.connection() as conn, conn.transaction():
            cursor = conn.cursor(row_factory=dict_row)
            plan = await self._locked(cursor, plan_id)
            await cursor.execute("SELECT copy_id FROM plaza_imports WHERE plan_id = %s AND "
                                 "user_id = %s", (plan_id, user))  # fmt: skip
            existing = await cursor.fetchone()
            if existing is None:
                domain.check_published(plan, user, "imported")
                copy_id = domain.new_plan_id()
                await cursor.execute(
                    "INSERT INTO plaza_plans (plan_id, author_id, title, summary, steps, tags, "
                    "status, imported_from, search, created_at, updated_at) SELECT %s, %s, "
                    "title, summary, steps, tags, 'private', plan_id, search, %s, %s FROM "
                    "plaza_plans WHERE plan_id = %s", (copy_id, user, now, now, plan_id),
                )  # fmt: skip
                await cursor.execute("INSERT INTO plaza_plan_counts (plan_id, published) "
                                     "VALUES (%s, false)", (copy_id,))  # fmt: skip
                await cursor.execute("INSERT INTO plaza_imports (plan_id, user_id, copy_id, "
                                     "imported_at) VALUES (%s, %s, %s, %s)",
                                     (plan_id, user, copy_id, now))  # fmt: skip
                await cursor.execute("UPDATE plaza_plan_counts SET import_count = import_count "
                                     "+ 1 WHERE plan_id = %s", (plan_id,))  # fmt: skip
                await self._emit(conn, self._event("plan.imported", plan, user, now,
                                                   copy_id=copy_id))  # fmt: skip
        copy = existing["copy_id"] if existing else copy_id
        return await self.plan(copy, user), existing is None

    async def like(self, user: str, plan_id: str, now: datetime, *, liked: bool) -> Row:
        """Like (or unlike) the plan; a repeat changes nothing and emits nothing."""
        async with self.pool.connection() as conn, conn.transaction():
            cursor = conn.cursor(row_factory=dict_row)
            plan = await self._locked(cursor, plan_id)
            domain.check_published(plan, user, "liked")
            if liked:
                await cursor.execute("INSERT INTO plaza_likes (plan_id, user_id, liked_at) "
                                     "VALUES (%s, %s, %s) ON CONFLICT DO NOTHING",
                                     (plan_id, user, now))  # fmt: skip
            else:
                await cursor.execute("DELETE FROM plaza_likes WHERE plan_id = %s AND "
                                     "user_id = %s", (plan_id, user))  # fmt: skip
            if cursor.rowcount == 1:
                step = 1 if liked else -1
                await cursor.execute("UPDATE plaza_plan_counts SET like_count = like_count + %s "
                                     "WHERE plan_id = %s", (step, plan_id))  # fmt: skip
                kind = "plan.liked" if liked else "plan.unliked"
                await self._emit(conn, self._event(kind, plan, user, now))
            await cursor.execute("SELECT like_count, import_count FROM plaza_plan_counts WHERE "
                                 "plan_id = %s", (plan_id,))  # fmt: skip
            counts = await cursor.fetchone()
        assert counts is not None, "the plan is locked"
        return {"plan_id": plan_id, "liked": liked, **counts}

    async def like_many(self, asks: list[LikeAsk], now: datetime) -> list[Row | Refused]:
        """Many users' likes in one transaction (one commit for all): to each ask, what
        :meth:`like` would answer it alone, or its refusal. The plans are locked in one
        order (no deadlock between two batches, nor with a change of one plan), a like
        already there changes nothing, and each new like counts once and writes its
        ``plan.liked`` event, with the trace of the request that asked for it."""
        async with self.pool.connection() as conn, conn.transaction():
            cursor = conn.cursor(row_factory=dict_row)
            await cursor.execute("SELECT plan_id, author_id, title, tags, status FROM "
                                 "plaza_plans WHERE plan_id = ANY(%s) ORDER BY plan_id FOR NO "
                                 "KEY UPDATE", (sorted({a.plan_id for a in asks}),))  # fmt: skip
            plans = {row["plan_id"]: row for row in await cursor.fetchall()}
            refused, wanted = _checked_likes(asks, plans)
            counts: dict[str, Row] = {}
            if wanted:
                await self._add_likes(conn, cursor, wanted, plans, now)
                await cursor.execute("SELECT plan_id, like_count, import_count FROM "
                                     "plaza_plan_counts WHERE plan_id = ANY(%s)",
                                     (list({a.plan_id for a in wanted}),))  # fmt: skip
                counts = {row.pop("plan_id"): row for row in await cursor.fetchall()}
        return [refused[n] if n in refused else {"plan_id": ask.plan_id, "liked": True,
                **counts[ask.plan_id]} for n, ask in enumerate(asks)]  # fmt: skip

    async def _add_likes(self, conn: psycopg.AsyncConnection[Any], cursor: AsyncCursor[Row],
                         wanted: list[LikeAsk], plans: dict[str, Row],
                         now: datetime) -> None:  # fmt: skip
        await cursor.execute("INSERT INTO plaza_likes (plan_id, user_id, liked_at) SELECT "
                             "plan_id, user_id, %s FROM unnest(%s::text[], %s::text[]) AS "
                             "a(plan_id, user_id) ON CONFLICT DO NOTHING RETURNING plan_id, "
                             "user_id", (now, [a.plan_id for a in wanted],
                             [a.user_id for a in wanted]))  # fmt: skip
        new = {(row["plan_id"], row["user_id"]) for row in await cursor.fetchall()}
        if not new:
            return
        gained = Counter(plan_id for plan_id, _ in new)
        await cursor.execute("UPDATE plaza_plan_counts p SET like_count = p.like_count + g.n FROM "
                             "unnest(%s::text[], %s::int[]) AS g(plan_id, n) WHERE p.plan_id = "
                             "g.plan_id", (list(gained), list(gained.values())))  # fmt: skip
        events = []
        for ask in wanted:  # in the asks' order, so the outbox keeps their arrival order
            if (ask.plan_id, ask.user_id) in new:
                event = self._event("plan.liked", plans[ask.plan_id], ask.user_id, now)
                events.append(self._outbox_item(event, ask.trace))
        await enqueue_many_async(conn, events)

    # -- comments ----------------------------------------------------------------------------

    async def comments(self, plan_id: str, viewer: str, cursor: str | None, limit: int) -> Page:
        """A page of the plan's thread, depth first, replies in the order written."""
        after = domain.parse_thread_cursor(cursor) if cursor is not None else []
        rows = await self._all(f"SELECT {COMMENT} FROM plaza_comments WHERE plan_id = %s AND "
                               "path > %s::bigint[] ORDER BY path LIMIT %s",
                               (plan_id, after, limit + 1))  # fmt: skip
        more = len(rows) > limit
        rows = rows[:limit]
        next_cursor = domain.thread_cursor(rows[-1]["path"]) if more else None
        return Page([shown_comment(row) for row in rows], next_cursor)

    async def post_comment(self, user: str, plan_id: str, body: str, parent_id: int | None,
                           now: datetime) -> Row:  # fmt: skip
        async with self.pool.connection() as conn, conn.transaction():
            cursor = conn.cursor(row_factory=dict_row)
            plan = await self._locked(cursor, plan_id)
            domain.check_published(plan, user, "commented on")
            path: list[int] = []
            if parent_id is not None:
                await cursor.execute("SELECT plan_id, path FROM plaza_comments WHERE "
                                     "comment_id = %s", (parent_id,))  # fmt: skip
                parent = await cursor.fetchone()
                domain.check_reply(parent, plan_id)
                assert parent is not None
                path = parent["path"]
            await cursor.execute("SELECT nextval(pg_get_serial_sequence('plaza_comments', "
                                 "'comment_id')) AS id")  # fmt: skip
            new = await cursor.fetchone()
            assert new is not None
            comment_id = int(new["id"])
            await cursor.execute(
                "INSERT INTO plaza_comments (comment_id, plan_id, parent_id, path, author_id, "
                f"body, created_at) OVERRIDING SYSTEM VALUE VALUES (%s, %s, %s, %s, %s, %s, %s) "
                f"RETURNING {COMMENT}",
                (comment_id, plan_id, parent_id, [*path, comment_id], user, body, now),
            )  # fmt: skip
            comment = await cursor.fetchone()
            assert comment is not None
            await cursor.execute("UPDATE plaza_plan_counts SET comment_count = comment_count + 1 "
                                 "WHERE plan_id = %s", (plan_id,))  # fmt: skip
            await self._emit(conn, self._event("comment.posted", plan, user, now,
                                               comment_id=comment_id,
                                               parent_id=parent_id))  # fmt: skip
        return shown_comment(comment)

    async def delete_comment(self, user: str, comment_id: int, now: datetime) -> Row:
        """Soft delete: the text goes, the comment and its replies stay. Repeating it is the
        same answer and no second event."""
        async with self.pool.connection() as conn, conn.transaction():
            cursor = conn.cursor(row_factory=dict_row)
            # The plan first, as every change of a thread locks it (no lock-order deadlock
            # with a reply being posted); a comment's plan never changes.
            await cursor.execute("SELECT plan_id FROM plaza_comments WHERE comment_id = %s",
                                 (comment_id,))  # fmt: skip
            found = await cursor.fetchone()
            if found is None:
                raise PlazaNotFound("comment_not_found", f"no comment {comment_id}")
            plan = await self._locked(cursor, found["plan_id"])
            await cursor.execute("SELECT author_id, deleted_at FROM plaza_comments WHERE "
                                 "comment_id = %s FOR NO KEY UPDATE", (comment_id,))  # fmt: skip
            comment = await cursor.fetchone()
            assert comment is not None, "comments are never deleted"
            domain.check_comment_author(comment, user)
            if comment["deleted_at"] is None:
                await cursor.execute("UPDATE plaza_comments SET body = '', deleted_at = %s "
                                     "WHERE comment_id = %s", (now, comment_id))  # fmt: skip
                await self._emit(conn, self._event("comment.deleted", plan, user, now,
                                                   comment_id=comment_id))  # fmt: skip
            await cursor.execute(f"SELECT {COMMENT} FROM plaza_comments WHERE comment_id = %s",
                                 (comment_id,))  # fmt: skip
            row = await cursor.fetchone()
        assert row is not None
        return shown_comment(row)


@dataclass(frozen=True)
class ListQuery:
    """A page of published plans as a query: ``shape`` is its SQL, written over one row
    ``a`` of parameters (``a.tag``, ``a.terms``, ``a.after_ts``, ``a.after_n``,
    ``a.after_id``, ``a.lim``), so pages of one shape are read for many asks in a single
    statement (plaza.reads); ``values`` are this ask's. The query reads ``limit + 1`` rows
    (the last says there is more) and not the viewer's flags."""

    shape: str
    values: tuple[Any, ...]
    # For a search: the same query over the first SEARCH_WINDOW plans in the page's order
    # only. One plan fits every ask of it (a bounded walk of the order's index), so a
    # batch's searches share one statement; when it finds fewer than ``a.lim`` plans, its
    # answer is not known to be the page's, and ``shape`` must be asked.
    windowed: str | None = None
    # For a search the window did not answer: the plans that match first (the search's GIN
    # index), then their order. Fenced (OFFSET 0), so the planner cannot turn it back into
    # a walk of the order's index, which for a rare word reads every plan (~150 ms at 100k).
    matched: str | None = None

    def params(self) -> dict[str, Any]:
        """The values by name, as :data:`ONE_ASK` takes them."""
        return dict(zip(ASK_PARAMS, self.values, strict=True))


SEARCH_WINDOW = 1000
ASK_PARAMS = ("tag", "terms", "after_ts", "after_n", "after_id", "lim")
# One ask's row of parameters, ``a``, for a ListQuery's shape.
ONE_ASK = (
    "(SELECT %(tag)s::text AS tag, %(terms)s::text AS terms, %(after_ts)s::timestamptz AS "
    "after_ts, %(after_n)s::bigint AS after_n, %(after_id)s::text AS after_id, %(lim)s::int AS "
    "lim) a"
)


def listing_sql(ask: Listing) -> ListQuery | None:
    """The query of ``ask``: newest or most popular first, by tag and search; None when
    the search has no searchable term. A malformed cursor is refused here."""
    terms = None
    where = ["p.status = 'published'"]
    if ask.query is not None:
        terms = tsquery(ask.query)
        if terms is None:
            return None
        where.append("p.search @@ a.terms::tsquery")
    # The source, and the order as its index has it: a page is a range of that index.
    source, key, key_id = PLANS, "p.created_at", "p.plan_id"
    if ask.sort == "newest" and ask.tag is not None and ask.query is None:
        # The tag's own index: a page is a range of it, however big the tag.
        source = ("plaza_plan_tags t JOIN plaza_plans p ON p.plan_id = t.plan_id "
                  "JOIN plaza_plan_counts c ON c.plan_id = p.plan_id")  # fmt: skip
        where.append("t.tag = a.tag")
        key, key_id = "t.created_at", "t.plan_id"
    elif ask.sort == "popular":
        # The counts' popular index (published plans only).
        source = "plaza_plan_counts c JOIN plaza_plans p ON p.plan_id = c.plan_id"
        where.append("c.published")
        key, key_id = "c.popularity", "c.plan_id"
    if ask.tag is not None and key != "t.created_at":
        where.append("p.tags @> ARRAY[a.tag]")
    after_ts = after_n = after_id = None
    if ask.cursor is not None:
        after, after_id = domain.parse_list_cursor(ask.cursor)
        if ask.sort == "newest":
            after_ts = EPOCH + timedelta(microseconds=after)
        else:
            after_n = after
        after_key = "a.after_ts" if ask.sort == "newest" else "a.after_n"
        where.append(f"({key}, {key_id}) < ({after_key}, a.after_id)")
    order = f"{key} DESC, {key_id} DESC"
    shape = f"SELECT {COLUMNS} FROM {source} WHERE {' AND '.join(where)} ORDER BY {order} " \
        "LIMIT a.lim"  # fmt: skip
    values = (ask.tag, terms, after_ts, after_n, after_id, ask.limit + 1)
    if terms is None:
        return ListQuery(shape, values)
    unsearched = " AND ".join(w for w in where if "a.terms" not in w)
    names = ", ".join(f"w.{column.split('.')[1]}" for column in COLUMNS.split(", "))
    in_order = f"ORDER BY w.{key.split('.')[1]} DESC, w.plan_id DESC LIMIT a.lim"
    windowed = (f"SELECT {names} FROM (SELECT {COLUMNS}, p.search FROM {source} WHERE "
                f"{unsearched} ORDER BY {order} LIMIT {SEARCH_WINDOW}) w WHERE w.search @@ "
                f"a.terms::tsquery {in_order}")  # fmt: skip
    matched = (f"SELECT {names} FROM (SELECT {COLUMNS} FROM {source} WHERE {unsearched} AND "
               "p.plan_id IN (SELECT s.plan_id FROM plaza_plans s WHERE s.search @@ "
               f"a.terms::tsquery AND s.status = 'published') OFFSET 0) w {in_order}")  # fmt: skip
    return ListQuery(shape, values, windowed, matched)


@dataclass(frozen=True)
class LikeAsk:
    """One request's like: who, which plan, and the request's trace (its event's)."""

    user_id: str
    plan_id: str
    trace: str | None


def _checked_likes(asks: list[LikeAsk], plans: dict[str, Row]
                   ) -> tuple[dict[int, Refused], list[LikeAsk]]:  # fmt: skip
    """The refusals by the asks' places, and the likes that may be made (each (user, plan)
    once, the first ask's trace)."""
    refused: dict[int, Refused] = {}
    wanted: dict[tuple[str, str], LikeAsk] = {}
    for n, ask in enumerate(asks):
        try:
            plan = plans.get(ask.plan_id)
            if plan is None:
                raise PlazaNotFound("plan_not_found", f"no plan {ask.plan_id!r}")
            domain.check_published(plan, ask.user_id, "liked")
        except Refused as refusal:
            refused[n] = refusal
            continue
        wanted.setdefault((ask.user_id, ask.plan_id), ask)
    return refused, list(wanted.values())


def _search(plan: Row) -> str:
    """A plan's search vector: its title, summary and every step's title and detail."""
    steps = plan["steps"]
    return vector(plan["title"], plan["summary"],
                  *(f"{s['title']}\n{s.get('detail') or ''}" for s in steps))  # fmt: skip


def shown_comment(comment: Row) -> Row:
    """A comment as the API shows it: its depth in the thread instead of its path."""
    shown = {k: v for k, v in comment.items() if k != "path"}
    shown["depth"] = len(comment["path"]) - 1
    return shown
