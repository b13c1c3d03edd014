"""The ``/plaza`` HTTP API and the plaza page (FastAPI on uvicorn).

Handlers are thin: check who asks, call :class:`PlazaRepository`, shape the reply. The
busiest requests (the list, a plan's detail, a like) are answered ahead of FastAPI by
:class:`plaza.fast.FastPath`, with batched reads (:class:`plaza.reads.PlazaReads`) and the
same replies; the routes here are the contract it is tested against.
Tokens are the credit store's (:mod:`contracts.tokens`, ``store.token_secret``): the same
user is the same principal on both. Anyone with a token reads the plaza; changes are the
caller's own (a plan's author edits and withdraws it, a comment's author deletes it).
Errors are ``{"error": {"code", "message"}}``: 401, 403, 404, 409, 413 and 422 for what
a client can send, 503 when Postgres cannot be reached, never a bare 500.
"""

from __future__ import annotations

import contextlib
import gc
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import orjson
import psycopg
from fastapi import APIRouter, Depends, FastAPI, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from psycopg_pool import PoolTimeout
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from contracts.cloudevents import current_trace, new_traceparent
from contracts.tokens import Principal, bearer, verify_token
from kernel.asgi import BodyLimit, json_error, page_router
from kernel.batching import Batcher
from kernel.errors import (
    Conflict,
    Forbidden,
    Invalid,
    NotFound,
    Refused,
    StackError,
    Unauthenticated,
)
from kernel.settings import Settings, project_path
from plaza.domain import Sort, normalise_tag
from plaza.fast import FastPath
from plaza.reads import PlazaReads
from plaza.repository import LikeAsk, Listing, PlazaRepository, Row
from plaza.schemas import CommentId, CommentIn, PlanId, PlanIn
from streams.codec import load_codec

PAGE_DIR = Path(__file__).parent / "page"
PREFIX = "/plaza"
MAX_LIMIT = 50


class PlazaService:
    def __init__(self, settings: Settings, *, dsn: str | None = None) -> None:
        self.settings = settings
        self.secret = settings.store.token_secret.get_secret_value().encode()
        codec = load_codec(project_path(settings.schemas.avro_dir))
        self.repo = PlazaRepository(settings, codec, dsn=dsn)
        plaza = settings.plaza
        self.reads = PlazaReads(self.repo, batch_max=plaza.read_batch,
                                batch_queries=plaza.read_queries)  # fmt: skip
        # Likes that wait together are made in one transaction: one commit for them all.
        self.likes = Batcher[LikeAsk, Row | Refused](
            lambda asks: self.repo.like_many(asks, now()),
            max_batch=plaza.read_batch,
            max_running=plaza.read_queries,
        )

    async def start(self) -> None:
        await self.repo.start()

    async def stop(self) -> None:
        await self.repo.close()

    async def readiness(self) -> dict[str, str]:
        try:
            await self.repo.tags(1)
            return {"postgres": "ok"}
        except (psycopg.Error, PoolTimeout, OSError, StackError) as exc:
            return {"postgres": f"failing: {type(exc).__name__}"}


def create_app(settings: Settings, *, dsn: str | None = None) -> ASGIApp:
    """The plaza's ASGI app: metrics and operator routes outermost, then the body limit, then
    the fast path (unless ``plaza.fast_reads`` is off), then FastAPI."""
    service = PlazaService(settings, dsn=dsn)
    inner: ASGIApp = create_fastapi(service)
    if settings.plaza.fast_reads:
        inner = FastPath(inner, service.reads, service.likes, service.secret, PREFIX,
                         settings.plaza.max_tag_chars)  # fmt: skip
    return Observed(BodyLimit(inner, settings.plaza.max_body_bytes), service)


def create_fastapi(service: PlazaService) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await service.start()
        gc.freeze()  # start-up's objects out of the full collections (as in the store)
        try:
            yield
        finally:
            await service.stop()

    app = FastAPI(title="creditledger plan plaza", version="1.0.0", lifespan=lifespan,
                  openapi_url=f"{PREFIX}/openapi.json", docs_url=f"{PREFIX}/docs",
                  redoc_url=None,
                  description="Shared plans: publish, find, like, import and discuss them. "
                  "Authenticate with `Authorization: Bearer <token>` (the credit store's "
                  "tokens: `creditledger store token USER`).")  # fmt: skip
    app.state.service = service
    _errors(app)
    app.include_router(
        page_router(PREFIX, PAGE_DIR, {"store_url": service.settings.plaza.store_url})
    )
    app.include_router(_plan_router(service))
    app.include_router(_comment_router(service))
    return app


class Observed:
    """Outermost layer: ``/healthz``, ``/readyz``, ``/metrics``, and every request counted
    by route template and status (the page's tests count its searches here), with the
    request's W3C trace for the events it causes."""

    def __init__(self, app: ASGIApp, service: PlazaService) -> None:
        self.app = app
        self.service = service
        self.registry = CollectorRegistry()
        self.requests = Counter("plaza_requests", "Plaza API requests.",
                                ["route", "method", "status"], registry=self.registry)  # fmt: skip
        self.seconds = Histogram("plaza_request_seconds", "Plaza API request duration.",
                                 ["route"], registry=self.registry)  # fmt: skip

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if scope["path"] in ("/metrics", "/healthz", "/readyz"):
            await self._operator(scope["path"], send)
            return
        started, status = time.perf_counter(), 500
        incoming = dict(scope["headers"]).get(b"traceparent")
        current_trace.set(new_traceparent(incoming.decode("latin-1") if incoming else None))

        async def observed(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, observed)
        finally:
            route = scope.get("route")
            label = str(route.path) if route is not None and hasattr(route, "path") \
                else scope.get("fast_route", "other")  # fmt: skip
            self.requests.labels(label, scope["method"], str(status)).inc()
            self.seconds.labels(label).observe(time.perf_counter() - started)

    async def _operator(self, path: str, send: Send) -> None:
        status, body, kind = 200, b'{"status":"ok"}', b"application/json"
        if path == "/metrics":
            body, kind = generate_latest(self.registry), CONTENT_TYPE_LATEST.encode()
        elif path == "/readyz":
            checks = await self.service.readiness()
            ok = all(value == "ok" for value in checks.values())
            status = 200 if ok else 503
            body = orjson.dumps({"status": "ready" if ok else "not_ready", "checks": checks})
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", kind)]})  # fmt: skip
        await send({"type": "http.response.body", "body": body})


# How the kinds of refusal (kernel.errors) read in HTTP: the domain knows no status. A rule
# the request breaks is 422, like a body that fails its schema.
STATUS_OF: dict[type[Refused], int] = {
    Invalid: 422, Unauthenticated: 401, Forbidden: 403, NotFound: 404, Conflict: 409,
}  # fmt: skip


def _errors(app: FastAPI) -> None:
    @app.exception_handler(Refused)
    async def refused(_: Request, exc: Refused) -> JSONResponse:
        status = next((s for kind, s in STATUS_OF.items() if isinstance(exc, kind)), 500)
        return json_error(status, exc.code, exc.message)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e.get('loc', ()) if p != 'body') or 'body'}: "
            f"{e.get('msg', 'invalid')}" for e in exc.errors()
        )  # fmt: skip
        return json_error(422, "invalid_request", problems or "invalid request")

    async def unavailable(_: Request, exc: Exception) -> JSONResponse:
        return json_error(503, "unavailable", "the plaza's storage cannot be reached; "
                          "try again shortly")  # fmt: skip

    for kind in (psycopg.OperationalError, PoolTimeout, StackError):
        app.add_exception_handler(kind, unavailable)


async def principal(
    request: Request, authorization: Annotated[str | None, Header()] = None
) -> Principal:
    service: PlazaService = request.app.state.service
    return verify_token(service.secret, bearer(authorization), int(time.time()))


Who = Annotated[Principal, Depends(principal)]
Limit = Annotated[int, Query(ge=1, le=MAX_LIMIT)]
Cursor = Annotated[str | None, Query(max_length=700)]


def now() -> datetime:
    return datetime.now(UTC)


def reply(value: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(value, option=orjson.OPT_UTC_Z), status_code=status,
                    media_type="application/json")  # fmt: skip


def _plan_router(service: PlazaService) -> APIRouter:
    router = APIRouter()
    repo = service.repo
    plaza = service.settings.plaza

    @router.get(f"{PREFIX}/config", summary="What the publishing form needs to know")
    async def config(who: Who) -> Any:
        return reply({"default_tag": plaza.default_tag, "max_tags": plaza.max_tags,
                      "max_tag_chars": plaza.max_tag_chars, "user_id": who.user_id})  # fmt: skip

    @router.get(f"{PREFIX}/plans", summary="Published plans: newest or most popular, by tag, "
                "searched; keyset pages")  # fmt: skip
    async def plans(who: Who, sort: Sort = "newest",
                    tag: Annotated[str | None, Query(max_length=200)] = None,
                    q: Annotated[str | None, Query(max_length=200)] = None,
                    cursor: Cursor = None, limit: Limit = 20) -> Any:  # fmt: skip
        wanted = normalise_tag(tag, plaza.max_tag_chars) if tag else None
        ask = Listing(sort, wanted, q or None, cursor, limit)
        page = await repo.listing(who.user_id, ask)
        return reply({"plans": page.items, "next_cursor": page.next_cursor})

    @router.post(f"{PREFIX}/plans", status_code=201, summary="Publish a plan")
    async def publish(who: Who, body: PlanIn) -> Any:
        plan = await repo.publish(who.user_id, _fields(body), body.tags, now())
        return reply(plan, 201)

    @router.get(f"{PREFIX}/plans/{{plan_id}}", summary="A plan, its steps and first comments")
    async def plan(who: Who, plan_id: PlanId, comments: Limit = 20) -> Any:
        return reply(await repo.plan(plan_id, who.user_id, comments=comments))

    @router.put(f"{PREFIX}/plans/{{plan_id}}", summary="Edit your plan")
    async def edit(who: Who, plan_id: PlanId, body: PlanIn) -> Any:
        return reply(await repo.update(who.user_id, plan_id, _fields(body), body.tags, now()))

    @router.delete(f"{PREFIX}/plans/{{plan_id}}", summary="Withdraw your plan")
    async def withdraw(who: Who, plan_id: PlanId) -> Any:
        return reply(await repo.withdraw(who.user_id, plan_id, now()))

    @router.post(f"{PREFIX}/plans/{{plan_id}}/import", summary="Copy a plan into your own plans "
                 "(once per user and plan)")  # fmt: skip
    async def import_plan(who: Who, plan_id: PlanId) -> Any:
        copy, created = await repo.import_plan(who.user_id, plan_id, now())
        return reply({"copy": copy, "created": created}, 201 if created else 200)

    @router.put(f"{PREFIX}/plans/{{plan_id}}/like", summary="Like a plan (idempotent)")
    async def like(who: Who, plan_id: PlanId) -> Any:
        return reply(await repo.like(who.user_id, plan_id, now(), liked=True))

    @router.delete(f"{PREFIX}/plans/{{plan_id}}/like", summary="Unlike a plan (idempotent)")
    async def unlike(who: Who, plan_id: PlanId) -> Any:
        return reply(await repo.like(who.user_id, plan_id, now(), liked=False))

    @router.get(f"{PREFIX}/me/plans", summary="Your plans: published, withdrawn, imported")
    async def mine(who: Who, limit: Limit = 50) -> Any:
        return reply({"plans": await repo.my_plans(who.user_id, limit)})

    @router.get(f"{PREFIX}/tags", summary="Tags of published plans, most used first")
    async def tags(who: Who, limit: Limit = 30) -> Any:
        return reply({"tags": await repo.tags(limit)})

    return router


def _comment_router(service: PlazaService) -> APIRouter:
    router = APIRouter()
    repo = service.repo

    @router.get(f"{PREFIX}/plans/{{plan_id}}/comments", summary="A page of a plan's thread "
                "(depth first)")  # fmt: skip
    async def thread(who: Who, plan_id: PlanId, cursor: Cursor = None, limit: Limit = 20) -> Any:
        await repo.plan(plan_id, who.user_id)  # not found unless the caller may see the plan
        page = await repo.comments(plan_id, who.user_id, cursor, limit)
        return reply({"comments": page.items, "next_cursor": page.next_cursor})

    @router.post(f"{PREFIX}/plans/{{plan_id}}/comments", status_code=201,
                 summary="Comment on a plan, or reply to a comment")  # fmt: skip
    async def post(who: Who, plan_id: PlanId, body: CommentIn) -> Any:
        comment = await repo.post_comment(who.user_id, plan_id, body.body, body.parent_id, now())
        return reply(comment, 201)

    @router.delete(f"{PREFIX}/comments/{{comment_id}}", summary="Delete your comment (its "
                   "replies stay)")  # fmt: skip
    async def delete(who: Who, comment_id: CommentId) -> Any:
        return reply(await repo.delete_comment(who.user_id, comment_id, now()))

    return router


def _fields(body: PlanIn) -> dict[str, Any]:
    return {"title": body.title, "summary": body.summary,
            "steps": [step.model_dump() for step in body.steps]}  # fmt: skip
