"""The ``/credit-store`` HTTP API and the store page (FastAPI on uvicorn).

Handlers are thin: check who asks, call :class:`StoreRepository` or
:class:`ReadModels`, shape the reply. Errors are ``{"error": {"code",
"message"}}`` with a 4xx for anything a client can send; a 503 says Postgres or
Redis cannot be reached, never a bare 500.

Who may do what:

- a **user** token sees and changes only its own balance, consumption, ledger,
  orders and check-in/sign-up claims;
- a **service** token (another service of the company) may claim event
  rewards on behalf of a user (``reference`` = the triggering event's id), and
  no other kind (sign-up and check-in rewards are the user's own to claim);
- an **admin** token may do all that for any user, and manage products, price
  rules and reward rules.

The payment callback is not called with a token: the payment provider signs it
(``X-Payment-Signature``, HMAC-SHA256 of ``order|reference|amount|currency``).
With ``store.simulated_provider`` on, the page pays through a simulated
provider that signs and delivers that callback, so the whole flow runs here.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import asdict, is_dataclass
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any, Literal

import orjson
import psycopg
from fastapi import APIRouter, Depends, FastAPI, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from psycopg_pool import PoolTimeout
from redis.exceptions import RedisError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from contracts.cloudevents import current_trace, new_traceparent
from contracts.tokens import Principal, bearer, verify_token
from kernel.asgi import BodyLimit, json_error, page_router
from kernel.errors import (
    Conflict,
    Forbidden,
    Invalid,
    NotFound,
    QueryError,
    Refused,
    StackError,
    StoreForbidden,
    StoreNotFound,
    Unauthenticated,
)
from kernel.settings import Settings, project_path
from pricing.source import read_yaml
from projections.queries import MAX_LIMIT, ReadModels
from store.domain import check_product, check_user_id, check_window, sign_payment, verify_payment
from store.hot_reads import HotReads
from store.metrics import StoreMetrics
from store.orders import Order, Payment
from store.repository import StoreRepository, decimal_text, utc_now
from store.rewards import check_rule, may_claim
from store.schemas import (
    OrderCreate,
    OrderId,
    PaymentCallback,
    PriceVersionCreate,
    ProductId,
    ProductPut,
    RewardClaim,
    RewardRulePut,
    RuleId,
    UserId,
)
from streams.codec import load_codec

log = logging.getLogger(__name__)

PAGE_DIR = Path(__file__).parent / "page"
PREFIX = "/credit-store"


def jsonable(value: Any) -> Any:
    """Rows and dataclasses as JSON: times in ISO 8601 UTC, exact decimals as strings."""
    if is_dataclass(value) and not isinstance(value, type):
        return jsonable(asdict(value))
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, datetime):
        return value.astimezone(UTC).isoformat().replace("+00:00", "Z")
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, Decimal):
        return decimal_text(value)
    return value


def fast_json(value: Any) -> Response:
    """The hot read routes: orjson serialises the dataclasses and UTC times natively, about
    ten times faster than walking them in Python (a 30-day series is ~60 nested objects)."""
    return Response(orjson.dumps(value, option=orjson.OPT_UTC_Z), media_type="application/json")


class StoreService:
    """What the routes share: settings, the repository, the read models, the fulfiller."""

    def __init__(self, settings: Settings, *, dsn: str | None = None,
                 redis_prefix: str | None = None, sweeper: bool = True) -> None:  # fmt: skip
        self.settings = settings
        self.sweeper = sweeper
        self.secret = settings.store.token_secret.get_secret_value().encode()
        self.payment_secret = settings.store.payment_secret.get_secret_value().encode()
        self.codec = load_codec(project_path(settings.schemas.avro_dir))
        self.repo = StoreRepository(settings, self.codec, dsn=dsn, pool_size=20)
        self.reads = ReadModels(settings, dsn=dsn, redis_prefix=redis_prefix, pool_size=20,
                                batch_max=settings.store.read_batch,
                                batch_queries=settings.store.read_queries)  # fmt: skip
        self.file_rules: list[dict[str, Any]] = []
        self._sweeper: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.file_rules = read_yaml(project_path(self.settings.proxy.price_rules_file))
        await self.repo.start()
        await self.reads.start()
        if self.sweeper:
            self._sweeper = asyncio.ensure_future(self._sweep_forever())

    async def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        await self.reads.close()
        await self.repo.close()

    async def _sweep_forever(self) -> None:
        """Expire stale orders; fulfil paid orders a crash left without their grant."""
        while True:
            try:
                await self.repo.expire_orders(utc_now())
                done = await self.repo.fulfil_pending()
                if done:
                    log.info("fulfilled %d paid order(s) left behind", done)
            except (psycopg.Error, PoolTimeout, OSError) as exc:
                log.warning("order sweep failed (%s); trying again", exc)
            await asyncio.sleep(self.settings.store.fulfil_interval_s)

    async def own_order(self, who: Principal, order_id: str) -> Order:
        """The order if ``who`` may see it (its owner, or an admin); else not found."""
        order = await self.repo.order(order_id)
        if order is None or (order.user_id != who.user_id and who.role != "admin"):
            raise StoreNotFound("order_not_found", f"no order {order_id!r}")
        return order

    async def pay(self, order_id: str, callback: PaymentCallback) -> Order:
        payment = Payment(callback.payment_reference, callback.amount_minor, callback.currency)
        outcome = await self.repo.record_payment(order_id, payment, utc_now())
        if outcome.newly_paid or outcome.order.status == "paid":
            delay = self.settings.store.fulfil_delay_ms
            if delay:  # fault injection (tests): a crash here must not lose the grant
                await asyncio.sleep(delay / 1000)
            await self.repo.fulfil(order_id)
        order = await self.repo.order(order_id)
        assert order is not None
        return order


# The page: its own scripts and styles only, no framing, no token in a Referer.


def create_app(settings: Settings, *, dsn: str | None = None, redis_prefix: str | None = None,
               sweeper: bool = True) -> ASGIApp:  # fmt: skip
    """The store's ASGI app: FastAPI, behind :class:`HotReads` unless ``store.fast_reads``
    is off, behind :class:`BodyLimit`. ``sweeper``: run the order sweep in this process
    (one worker of several does)."""
    app = create_fastapi(settings, dsn=dsn, redis_prefix=redis_prefix, sweeper=sweeper)
    service: StoreService = app.state.service
    inner: ASGIApp = app
    if settings.store.fast_reads:
        inner = HotReads(app, service.reads, service.secret, PREFIX)
    return Observed(BodyLimit(inner, settings.store.max_body_bytes), service.reads)


class Observed:
    """The outermost layer: every request traced and measured (hot reads too), and the
    operators' routes, /metrics, /healthz and /readyz, answered here."""

    def __init__(self, app: ASGIApp, reads: ReadModels) -> None:
        self.app = app
        self.reads = reads
        self.metrics = StoreMetrics()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        if path in ("/metrics", "/healthz", "/readyz"):
            await self._operator(path, send)
            return
        # The request's span (in the caller's trace if it sent one): the grants it causes
        # carry it into the outbox, the command and the ledger entry.
        headers = dict(scope["headers"])
        current_trace.set(new_traceparent(headers.get(b"traceparent", b"").decode("latin-1")))
        started = time.perf_counter()
        status = 500

        async def observed(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, observed)
        finally:
            route = _route_label(scope)
            self.metrics.requests.labels(route, scope["method"], str(status)).inc()
            self.metrics.seconds.labels(route).observe(time.perf_counter() - started)

    async def _operator(self, path: str, send: Send) -> None:
        status, body, kind = 200, b'{"status":"ok"}', b"application/json"
        if path == "/metrics":
            body, kind = generate_latest(self.metrics.registry), CONTENT_TYPE_LATEST.encode()
        elif path == "/readyz":
            checks = await self.reads.readiness()
            ok = all(value == "ok" for value in checks.values())
            status = 200 if ok else 503
            body = orjson.dumps({"status": "ready" if ok else "not_ready", "checks": checks})
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", kind)]})  # fmt: skip
        await send({"type": "http.response.body", "body": body})


# The hot reads answer before any router: their paths carry no id.
HOT_PATHS = {f"{PREFIX}/balance", f"{PREFIX}/consumption", f"{PREFIX}/ledger"}


def _route_label(scope: Scope) -> str:
    """A bounded label: the matched route's template, a hot read's path, else "other"."""
    route = scope.get("route")
    if route is not None and hasattr(route, "path"):
        return str(route.path)
    return scope["path"] if scope["path"] in HOT_PATHS else "other"


def create_fastapi(settings: Settings, *, dsn: str | None = None,
                   redis_prefix: str | None = None, sweeper: bool = True) -> FastAPI:  # fmt: skip
    service = StoreService(settings, dsn=dsn, redis_prefix=redis_prefix, sweeper=sweeper)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await service.start()
        # What start-up loaded lives as long as the process: keep it out of the collector's
        # full passes, which otherwise pause every request in flight (as in the proxy).
        gc.freeze()
        try:
            yield
        finally:
            await service.stop()

    app = FastAPI(title="creditledger credit store", version="1.0.0", lifespan=lifespan,
                  openapi_url=f"{PREFIX}/openapi.json", docs_url=f"{PREFIX}/docs",
                  redoc_url=None,
                  description="Balance, consumption, ledger history, credit packs, orders and "
                  "rewards. Authenticate with `Authorization: Bearer <token>` "
                  "(`creditledger store token USER`).")  # fmt: skip
    app.state.service = service
    _errors(app)
    _routes(app, service)
    return app


# How the store's kinds of refusal (kernel.errors) read in HTTP: the domain knows no status.
STATUS_OF: dict[type[Refused], int] = {
    Invalid: 400, Unauthenticated: 401, Forbidden: 403, NotFound: 404, Conflict: 409,
}  # fmt: skip


def status_of(exc: Refused) -> int:
    # A bare Refused has no kind: a bug of ours, not the client's fault.
    return next((status for kind, status in STATUS_OF.items() if isinstance(exc, kind)), 500)


def _errors(app: FastAPI) -> None:
    @app.exception_handler(Refused)
    async def store_error(_: Request, exc: Refused) -> JSONResponse:
        return json_error(status_of(exc), exc.code, exc.message)

    @app.exception_handler(QueryError)
    async def query_error(_: Request, exc: QueryError) -> JSONResponse:
        return json_error(400, "invalid_query", str(exc))

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', 'invalid')}"
            for e in exc.errors()
        )
        return json_error(422, "invalid_request", problems or "invalid request")

    async def unavailable(_: Request, exc: Exception) -> JSONResponse:
        log.warning("storage unavailable: %s", exc)
        return json_error(503, "unavailable", "the credit store's storage cannot be reached; "
                     "try again shortly")  # fmt: skip

    for kind in (psycopg.OperationalError, PoolTimeout, RedisError, StackError):
        app.add_exception_handler(kind, unavailable)


async def principal(
    request: Request, authorization: Annotated[str | None, Header()] = None
) -> Principal:
    # async: FastAPI runs a plain ``def`` dependency in a worker thread, a hop per request.
    service: StoreService = request.app.state.service
    return verify_token(service.secret, bearer(authorization), int(time.time()))


async def admin(who: Annotated[Principal, Depends(principal)]) -> Principal:
    if who.role != "admin":
        raise StoreForbidden("forbidden", "this needs an admin token")
    return who


Who = Annotated[Principal, Depends(principal)]
Admin = Annotated[Principal, Depends(admin)]
Limit = Annotated[int, Query(ge=1, le=MAX_LIMIT)]
Cursor = Annotated[str | None, Query(max_length=32)]
PeriodQ = Annotated[Literal["24h", "7d", "30d", "all"], Query()]


def _routes(app: FastAPI, service: StoreService) -> None:
    """Every route, by who calls it: the page, users (and services, admins acting for
    them), the payment provider, admins, and the retired token store's forwarding."""
    app.include_router(
        page_router(PREFIX, PAGE_DIR, {"plaza_url": service.settings.store.plaza_url})
    )
    app.include_router(_user_router(service))
    app.include_router(_payment_router(service))
    app.include_router(_admin_router(service))
    app.include_router(_old_world_router())


def _user_router(service: StoreService) -> APIRouter:
    """What a token's holder sees and does for itself: balance, consumption, ledger,
    products, orders, rewards (a service or an admin claims for others)."""
    router = APIRouter()

    @router.get(f"{PREFIX}/balance", summary="The caller's balance snapshot")
    async def balance(who: Who) -> Any:
        return fast_json(await service.reads.balance(who.user_id))

    @router.get(f"{PREFIX}/consumption", summary="Credits and tokens used over a period")
    async def consumption(who: Who, period: PeriodQ = "24h") -> Any:
        return fast_json(await service.reads.consumption(who.user_id, period))

    @router.get(f"{PREFIX}/ledger", summary="The caller's ledger history, newest first")
    async def ledger(who: Who, cursor: Cursor = None, limit: Limit = 20) -> Any:
        return fast_json(await service.reads.history(who.user_id, cursor=cursor, limit=limit))

    @router.get(f"{PREFIX}/products", summary="Credit packs on sale now")
    async def products(who: Who) -> Any:
        return jsonable(await service.repo.products(utc_now()))

    @router.post(f"{PREFIX}/orders", status_code=201, summary="Order a pack (price frozen now)")
    async def create_order(who: Who, body: OrderCreate) -> Any:
        return jsonable(await service.repo.create_order(who.user_id, body.product_id,
                                                        utc_now()))  # fmt: skip

    @router.get(f"{PREFIX}/orders", summary="The caller's orders, newest first")
    async def orders(who: Who, limit: Limit = 20) -> Any:
        return jsonable(await service.repo.orders(who.user_id, limit))

    @router.get(f"{PREFIX}/orders/{{order_id}}", summary="One of the caller's orders")
    async def order(who: Who, order_id: OrderId) -> Any:
        return jsonable(await service.own_order(who, order_id))

    @router.post(f"{PREFIX}/orders/{{order_id}}/cancel", summary="Cancel an unpaid order")
    async def cancel(who: Who, order_id: OrderId) -> Any:
        return jsonable(await service.repo.cancel_order(who.user_id, order_id, utc_now()))

    @router.get(f"{PREFIX}/rewards", summary="Reward rules active now")
    async def rewards(who: Who) -> Any:
        now = utc_now()
        return jsonable([r for r in await service.repo.reward_rules()
                         if r["active_from"] <= now
                         and (r["active_until"] is None or r["active_until"] > now)])  # fmt: skip

    @router.post(f"{PREFIX}/rewards/{{rule_id}}/claim",
                 summary="Claim a reward, once per rule, user and period")  # fmt: skip
    async def claim(who: Who, rule_id: RuleId, body: RewardClaim | None = None) -> Any:
        body = body or RewardClaim()
        user_id = body.user_id or who.user_id
        rule = await service.repo.reward_rule(rule_id)
        may_claim(who, rule.kind, user_id)
        outcome = await service.repo.claim(rule, user_id, body.reference, utc_now())
        return JSONResponse(jsonable({**outcome.claim, "granted": outcome.granted}),
                            status_code=201 if outcome.granted else 200)  # fmt: skip

    return router


def _payment_router(service: StoreService) -> APIRouter:
    """The payment provider's signed callback, and the simulated provider (loopback only)."""
    router = APIRouter()

    @router.post(f"{PREFIX}/orders/{{order_id}}/pay",
                 summary="Payment provider callback (signed), idempotent by payment")  # fmt: skip
    async def pay(order_id: OrderId, body: PaymentCallback,
                  x_payment_signature: Annotated[str, Header(max_length=200)]) -> Any:  # fmt: skip
        verify_payment(service.payment_secret, x_payment_signature, order_id,
                       body.payment_reference, body.amount_minor, body.currency)  # fmt: skip
        return jsonable(await service.pay(order_id, body))

    @router.post(f"{PREFIX}/simulated-provider/orders/{{order_id}}/checkout",
                 summary="The simulated payment provider: pays and signs")  # fmt: skip
    async def simulated_checkout(who: Who, order_id: OrderId) -> Any:
        if not service.settings.store.simulated_provider:
            raise StoreNotFound("not_found", "the simulated payment provider is off")
        order = await service.own_order(who, order_id)
        callback = PaymentCallback(
            payment_reference=f"sim_{order_id}",
            amount_minor=order.price_minor,
            currency=order.currency,
        )
        signature = sign_payment(service.payment_secret, order_id, callback.payment_reference,
                                 callback.amount_minor, callback.currency)  # fmt: skip
        verify_payment(service.payment_secret, signature, order_id, callback.payment_reference,
                       callback.amount_minor, callback.currency)  # fmt: skip
        return jsonable(await service.pay(order_id, callback))

    return router


def _admin_router(service: StoreService) -> APIRouter:
    """Admin tokens only: any user's data, products, price rules, reward rules."""
    router = APIRouter()

    @router.get(f"{PREFIX}/admin/users/{{user_id}}/ledger", summary="Any user's ledger (admin)")
    async def user_ledger(_: Admin, user_id: UserId, cursor: Cursor = None,
                          limit: Limit = 20) -> Any:  # fmt: skip
        check_user_id(user_id)
        return jsonable(await service.reads.history(user_id, cursor=cursor, limit=limit))

    @router.get(f"{PREFIX}/admin/users/{{user_id}}/balance", summary="Any user's balance (admin)")
    async def user_balance(_: Admin, user_id: UserId) -> Any:
        return jsonable(await service.reads.balance(user_id))

    @router.get(f"{PREFIX}/admin/products", summary="Every product, on sale or not (admin)")
    async def all_products(_: Admin) -> Any:
        return jsonable(await service.repo.products(None, include_inactive=True))

    @router.put(f"{PREFIX}/admin/products/{{product_id}}", summary="Create or change a product")
    async def put_product(_: Admin, product_id: ProductId, body: ProductPut) -> Any:
        check_product(body.price_minor, body.original_price_minor)
        fields = _windowed(body)
        return jsonable(await service.repo.put_product({**fields, "product_id": product_id}))

    @router.get(f"{PREFIX}/admin/price-rules", summary="Every price rule version in the database")
    async def price_rules(_: Admin) -> Any:
        return jsonable(await service.repo.price_rule_versions())

    @router.post(f"{PREFIX}/admin/price-rules/{{rule_id}}/versions", status_code=201,
                 summary="Add the next version of a price rule, active from a time")  # fmt: skip
    async def add_price_version(_: Admin, rule_id: RuleId, body: PriceVersionCreate) -> Any:
        now = utc_now()
        row = await service.repo.add_price_rule_version(rule_id, body.as_fields(now),
                                                        service.file_rules, now)  # fmt: skip
        return jsonable(row)

    @router.get(f"{PREFIX}/admin/reward-rules", summary="Every reward rule (admin)")
    async def reward_rules(_: Admin) -> Any:
        return jsonable(await service.repo.reward_rules())

    @router.put(f"{PREFIX}/admin/reward-rules/{{rule_id}}",
                summary="Create or change a reward rule")  # fmt: skip
    async def put_reward_rule(_: Admin, rule_id: RuleId, body: RewardRulePut) -> Any:
        check_rule(body.kind, body.period, body.cap_per_period, body.trigger_event)
        fields = _windowed(body)
        return jsonable(await service.repo.put_reward_rule({**fields, "rule_id": rule_id}))

    @router.delete(f"{PREFIX}/admin/reward-rules/{{rule_id}}",
                   summary="End a reward rule now (claims made stay)")  # fmt: skip
    async def end_reward_rule(_: Admin, rule_id: RuleId) -> Any:
        return jsonable(await service.repo.end_reward_rule(rule_id, utc_now()))

    return router


def _old_world_router() -> APIRouter:
    """The retired /token-store: 410 with the successor's location."""
    router = APIRouter()

    @router.api_route("/token-store", methods=["GET", "POST", "PUT", "DELETE", "PATCH"],
                      include_in_schema=False)  # fmt: skip
    @router.api_route("/token-store/{rest:path}", methods=["GET", "POST", "PUT", "DELETE", "PATCH"],
                      include_in_schema=False)  # fmt: skip
    async def token_store_gone(rest: str = "") -> JSONResponse:
        return JSONResponse(
            {"error": {"code": "gone", "message": "the token store is retired: balances, "
                       "history and purchases are in credits now, at /credit-store",
                       "location": PREFIX}}, status_code=410,
            headers={"Link": f'<{PREFIX}>; rel="successor-version"'},
        )  # fmt: skip

    return router


def _windowed(body: ProductPut | RewardRulePut) -> dict[str, Any]:
    """The body's fields with its active window checked; no ``active_from``: always was."""
    fields = body.model_dump()
    fields["active_from"] = body.active_from or datetime(1970, 1, 1, tzinfo=UTC)
    check_window(fields["active_from"], body.active_until)
    return fields
