"""The plaza's busiest requests, answered before FastAPI sees them.

``GET /plaza/plans`` (the list, by tag, searched), ``GET /plaza/plans/{id}`` (a plan with
its first comments) and ``PUT /plaza/plans/{id}/like`` are most of the plaza's traffic.
Through FastAPI each crosses its middleware stack and dependency solver, which cost
about as much CPU as the queries (a profile under 100 clients put a third of the process
there). :class:`FastPath` answers these directly, as the credit store's hot reads do, but
**only a request it can answer exactly as the route would**: the method and path of the
route, a bearer token that verifies, and parameters that are known, single and plainly
valid. Anything else, and any refusal or storage trouble, goes on to the FastAPI route
unchanged, which owns the contract (the OpenAPI document, the 401/404/422/503 replies):
a like is a transaction that either committed or left nothing behind, and liking twice
is liking once, so handing a failed one on is safe. The fast path changes speed, never
behaviour; ``tests/plaza/integration/test_plaza_fast.py`` compares the two.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any

import psycopg
from psycopg_pool import PoolTimeout
from starlette.types import ASGIApp, Receive, Scope, Send

from contracts.cloudevents import current_trace
from contracts.tokens import Principal, verify_token
from kernel.asgi import Fallback, Query, bearer_of, bounded_int, only, query_of, send_json
from kernel.batching import Batcher
from kernel.errors import CreditLedgerError, Refused
from plaza.domain import normalise_tag
from plaza.reads import PlazaReads
from plaza.repository import LikeAsk, Listing, Row

log = logging.getLogger(__name__)

PLAN = re.compile(r"/plaza/plans/(p_[0-9a-f]{24})(/like)?")
SORTS = ("newest", "popular")
TEXT_MAX = 200  # the routes' Query(max_length=200) for tag and q
CURSOR_MAX = 700
MAX_LIMIT = 50

Likes = Batcher[LikeAsk, Row | Refused]  # likes that wait together, made in one transaction
Handler = Callable[[Principal, Query, str], Awaitable[Any]]


class FastPath:
    def __init__(self, app: ASGIApp, reads: PlazaReads, likes: Likes, secret: bytes,
                 prefix: str, max_tag_chars: int) -> None:  # fmt: skip
        self.app = app
        self.reads = reads
        self.likes = likes
        self.secret = secret
        self.max_tag_chars = max_tag_chars
        self.list_path = f"{prefix}/plans"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        handler = self._route(scope) if scope["type"] == "http" else None
        if handler is None:
            await self.app(scope, receive, send)
            return
        route, answer, plan_id = handler
        try:
            who = self._principal(scope)
            value = await answer(who, query_of(scope), plan_id)
        except Fallback:
            await self.app(scope, receive, send)
            return
        except (psycopg.Error, PoolTimeout, OSError, CreditLedgerError) as exc:
            # The route answers these (404, 422, 503) in the documented shape; let it try.
            log.debug("fast path handed to the route after %r", exc)
            await self.app(scope, receive, send)
            return
        scope["fast_route"] = route  # the metrics' label, as the route's template
        await send_json(send, value)

    def _route(self, scope: Scope) -> tuple[str, Handler, str] | None:
        path, method = scope["path"], scope["method"]
        if path == self.list_path:
            return (path, self._list, "") if method == "GET" else None
        match = PLAN.fullmatch(path)
        if match is None:
            return None
        if match[2] is None:
            return (f"{self.list_path}/{{plan_id}}", self._detail, match[1]) \
                if method == "GET" else None  # fmt: skip
        return (f"{self.list_path}/{{plan_id}}/like", self._like, match[1]) \
            if method == "PUT" else None  # fmt: skip

    def _principal(self, scope: Scope) -> Principal:
        try:
            return verify_token(self.secret, bearer_of(scope), int(time.time()))
        except CreditLedgerError as exc:
            raise Fallback from exc

    async def _list(self, who: Principal, query: Query, _: str) -> Any:
        only(query, ("sort", "tag", "q", "cursor", "limit"))
        sort = query.get("sort", "newest")
        tag, q, cursor = query.get("tag"), query.get("q"), query.get("cursor")
        if sort not in SORTS or len(tag or "") > TEXT_MAX or len(q or "") > TEXT_MAX \
                or len(cursor or "") > CURSOR_MAX:  # fmt: skip
            raise Fallback
        limit = bounded_int(query.get("limit"), 20, 1, MAX_LIMIT)
        wanted = normalise_tag(tag, self.max_tag_chars) if tag else None
        ask = Listing(sort, wanted, q or None, cursor, limit)  # type: ignore[arg-type]
        page = await self.reads.listing(who.user_id, ask)
        return {"plans": page.items, "next_cursor": page.next_cursor}

    async def _detail(self, who: Principal, query: Query, plan_id: str) -> Any:
        only(query, ("comments",))
        comments = bounded_int(query.get("comments"), 20, 1, MAX_LIMIT)
        return await self.reads.plan(plan_id, who.user_id, comments)

    async def _like(self, who: Principal, query: Query, plan_id: str) -> Any:
        only(query, ())
        made = await self.likes.get(LikeAsk(who.user_id, plan_id, current_trace.get()))
        if isinstance(made, Refused):
            raise made  # the route words it
        return made
