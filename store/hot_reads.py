"""The three reads the store page polls, answered before FastAPI sees them.

``GET balance``, ``GET consumption`` and ``GET ledger`` are most of the store's
traffic. Through FastAPI each one crosses seven middleware layers, a dependency
solver and a thread hop, which cost more CPU than the read itself (a profile
under 100 clients put ~45% of the process in the framework). :class:`HotReads`
is a thin ASGI layer in front of the FastAPI app that answers these three
directly, but **only a request it can answer exactly as FastAPI would**: a GET
on the exact path, a well-formed bearer token that verifies, and query
parameters that are known, single and valid. Anything else (no token, a bad
token, a bad ``period``, an unknown parameter, storage trouble) goes on to the
FastAPI route unchanged, which owns the contract: the OpenAPI document, the
validation messages, the 401/422/503 replies. So the fast path changes speed,
never behaviour; ``tests/store/integration/test_store_hot_reads.py`` compares the two
byte for byte.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import psycopg
from psycopg_pool import PoolTimeout
from redis.exceptions import RedisError
from starlette.types import ASGIApp, Receive, Scope, Send

from contracts.tokens import Principal, verify_token
from kernel.asgi import Fallback, Query, bearer_of, bounded_int, only, query_of, send_json
from kernel.errors import CreditLedgerError
from projections.queries import MAX_LIMIT, ReadModels

log = logging.getLogger(__name__)

PERIODS = frozenset(("24h", "7d", "30d", "all"))
CURSOR_MAX = 32  # as the FastAPI route's ``Query(max_length=32)``


class HotReads:
    def __init__(self, app: ASGIApp, reads: ReadModels, secret: bytes, prefix: str) -> None:
        self.app = app
        self.reads = reads
        self.secret = secret
        self.routes: dict[str, Callable[[Principal, Query], Awaitable[Any]]] = {
            f"{prefix}/balance": self._balance,
            f"{prefix}/consumption": self._consumption,
            f"{prefix}/ledger": self._ledger,
        }

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        route = self.routes.get(scope["path"]) if scope["type"] == "http" else None
        if route is None or scope["method"] != "GET":
            await self.app(scope, receive, send)
            return
        try:
            who = self._principal(scope)
            value = await route(who, query_of(scope))
        except Fallback:
            await self.app(scope, receive, send)
            return
        except (psycopg.Error, PoolTimeout, RedisError, OSError, CreditLedgerError) as exc:
            # The route answers these (503, 400) in the documented shape; let it try.
            log.debug("hot read handed to the route after %r", exc)
            await self.app(scope, receive, send)
            return
        await send_json(send, value)

    def _principal(self, scope: Scope) -> Principal:
        try:
            return verify_token(self.secret, bearer_of(scope), int(time.time()))
        except CreditLedgerError as exc:
            raise Fallback from exc

    async def _balance(self, who: Principal, query: Query) -> Any:
        only(query, ())
        return await self.reads.balance(who.user_id)

    async def _consumption(self, who: Principal, query: Query) -> Any:
        only(query, ("period",))
        period = query.get("period", "24h")
        if period not in PERIODS:
            raise Fallback
        return await self.reads.consumption(who.user_id, period)

    async def _ledger(self, who: Principal, query: Query) -> Any:
        only(query, ("cursor", "limit"))
        cursor = query.get("cursor")
        limit = bounded_int(query.get("limit"), 20, 1, MAX_LIMIT)
        if cursor is not None and len(cursor) > CURSOR_MAX:
            raise Fallback
        return await self.reads.history(who.user_id, cursor=cursor, limit=limit)
