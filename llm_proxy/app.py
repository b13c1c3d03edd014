"""The OpenAI-compatible proxy's ASGI app: routing and lifecycle (run by uvicorn, see
``serve``).

``start()`` connects what a call needs (the Postgres pool, Redis, the guard, the charge
writer, one upstream client per model alias, the price rules and their refresh) and
hands them to :class:`~llm_proxy.call.CallPipeline` as its ports; a call is
authenticate the service -> read the billing headers -> read the body -> the pipeline
(:mod:`llm_proxy.call`). Request and answer formats are in :mod:`llm_proxy.wire`.

Upstream answers pass through byte for byte (the SDK's low-level ``post`` with
``cast_to=httpx.Response`` keeps its retries and timeouts without re-parsing).
The one change to a stream: the proxy always asks for the final usage chunk,
and drops it again when the client did not ask for it.

Plain ASGI rather than a framework, because the proxy's whole budget is about
a millisecond per call and there are four routes.
"""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import redis.asyncio as aioredis
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from psycopg_pool import AsyncConnectionPool

from contracts.cloudevents import TRACEPARENT, current_trace, new_traceparent
from contracts.fields import MODEL, NAME
from contracts.records import CHARGE_TOPIC
from kernel.errors import CreditLedgerError, PricingError, ProxyError
from kernel.settings import ModelAlias, Settings, project_path
from llm_proxy import usage as usage_mod
from llm_proxy import wire
from llm_proxy.auth import ServiceRegistry
from llm_proxy.billing import from_headers
from llm_proxy.call import CallPipeline, now_ms, respond
from llm_proxy.charges import ChargeWriter
from llm_proxy.guard import CreditBalanceGuard
from llm_proxy.metrics import ProxyMetrics
from llm_proxy.upstream import SdkUpstream, upstream_client
from pricing.rules import PriceBook
from pricing.source import TABLE_QUERY, merge, read_yaml, table_rows_to_rules
from streams.access import check_access
from streams.codec import AvroCodec, load_codec

log = logging.getLogger(__name__)

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class ProxyApp:
    def __init__(self, settings: Settings, *, prefix: str | None = None,
                 dsn: str | None = None) -> None:  # fmt: skip
        self.settings = settings
        self.prefix = prefix
        self.dsn = dsn or settings.postgres_dsn
        self.metrics = ProxyMetrics()
        self.services = ServiceRegistry(settings.proxy.services)
        self.aliases = {m.alias: m for m in settings.proxy.models}
        self.prices = PriceBook({})
        self._file_rules: list[dict[str, Any]] = []
        self.upstream: SdkUpstream | None = None
        self._refresher: asyncio.Task[None] | None = None
        self.codec: AvroCodec | None = None
        self.pool: AsyncConnectionPool[Any] | None = None
        self.redis: aioredis.Redis | None = None
        self.guard: CreditBalanceGuard | None = None
        self.writer: ChargeWriter | None = None
        self.pipeline: CallPipeline | None = None

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        proxy = self.settings.proxy
        if not self.aliases or not len(self.services):
            raise CreditLedgerError("proxy.models and proxy.services must not be empty: "
                                    "configure at least one model alias and one service key "
                                    "(see config.example.yaml)")  # fmt: skip
        self._check_names()
        # Charges go through Postgres; Kafka is written only while Postgres is down, so a
        # broker that is down does not stop the start, but a login or ACL that cannot work
        # does.
        await asyncio.to_thread(check_access, self.settings, write=[CHARGE_TOPIC],
                                timeout_s=3, unreachable_ok=True)  # fmt: skip
        self._file_rules = read_yaml(project_path(proxy.price_rules_file))
        self.prices = merge(self._file_rules, [])
        usage_mod.load_encoding()
        self.codec = load_codec(project_path(self.settings.schemas.avro_dir))
        self.pool = AsyncConnectionPool(
            self.dsn, min_size=2, max_size=20, open=False, timeout=2.0,
            kwargs={"autocommit": True,
                    "connect_timeout": self.settings.postgres.connect_timeout_s},
        )  # fmt: skip
        await self.pool.open(wait=False)  # the proxy starts even while Postgres is down
        self.redis = aioredis.Redis.from_url(
            self.settings.redis_url, socket_timeout=self.settings.redis.socket_timeout_ms / 1000,
            socket_connect_timeout=self.settings.redis.socket_timeout_ms / 1000,
            max_connections=1000,
        )  # fmt: skip
        self.guard = CreditBalanceGuard(self.settings, self.redis, self.pool, prefix=self.prefix)
        self.writer = ChargeWriter(self.settings, self.codec, self.pool)
        self.writer.start()
        await self.refresh_prices()
        for alias in self.aliases.values():
            self._check_rule(alias)
        self.upstream = SdkUpstream({alias.alias: upstream_client(alias, proxy)
                                     for alias in self.aliases.values()}, self.metrics)  # fmt: skip
        self.pipeline = CallPipeline(self.settings, guard=self.guard, charges=self.writer,
                                     upstream=self.upstream, prices=lambda: self.prices,
                                     metrics=self.metrics)  # fmt: skip
        self._refresher = asyncio.ensure_future(self._refresh_loop())
        # Everything loaded so far (the SDK, pydantic models, tiktoken's ranks) lives as long
        # as the process: keep it out of the collector's full passes, which otherwise stop
        # every call in flight for several milliseconds.
        gc.freeze()

    def _check_names(self) -> None:
        """Names that end up in charges follow the field rules, or no charge would fold."""
        proxy = self.settings.proxy
        names = [("proxy.producer_name", proxy.producer_name)]
        names += [(f"proxy.services[].name {s.name!r}", s.name) for s in proxy.services]
        for alias in proxy.models:
            names += [
                (f"proxy.models[].alias {alias.alias!r}", alias.alias),
                (f"proxy.models[].price_rule of {alias.alias!r}", alias.price_rule),
            ]
            if not MODEL.ok(alias.upstream_model):
                raise CreditLedgerError(f"proxy.models[].upstream_model of {alias.alias!r} "
                                        f"must be {MODEL.description}")  # fmt: skip
        for setting, value in names:
            if not NAME.ok(value):
                raise CreditLedgerError(f"{setting} must be {NAME.description}")

    def _check_rule(self, alias: ModelAlias) -> None:
        try:
            self.prices.active(alias.price_rule, now_ms())
        except PricingError as exc:
            raise CreditLedgerError(f"model alias {alias.alias!r}: {exc}") from exc

    async def refresh_prices(self) -> None:
        assert self.pool is not None
        try:
            async with self.pool.connection(timeout=2.0) as conn:
                rows = await (await conn.execute(TABLE_QUERY)).fetchall()
            self.prices = merge(self._file_rules, table_rows_to_rules(rows))
        except CreditLedgerError as exc:
            log.error("price rules not reloaded, keeping the previous ones: %s", exc)
        except Exception as exc:  # Postgres down or not migrated: keep what we have
            log.warning("price_rules table unreadable (%s); using %d rule(s) loaded before",
                        exc, len(self.prices.rules))  # fmt: skip

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.proxy.price_rules_refresh_s)
            await self.refresh_prices()

    async def stop(self) -> None:
        if self._refresher is not None:
            self._refresher.cancel()
        if self.pipeline is not None:
            await self.pipeline.drain()
        if self.upstream is not None:
            await self.upstream.close()
        if self.writer is not None:
            await asyncio.to_thread(self.writer.close)
        if self.redis is not None:
            await self.redis.aclose()
        if self.pool is not None:
            await self.pool.close()

    # -- ASGI ------------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        path, method = scope["path"], scope["method"]
        route = {"/v1/chat/completions": "chat", "/v1/embeddings": "embeddings"}.get(path)
        started = False

        async def tracked(message: Message) -> None:
            nonlocal started
            started = True
            await send(message)

        try:
            if route and method == "POST":
                await self._call(route, scope, receive, tracked)
            elif path == "/v1/models" and method == "GET":
                self._authenticate(scope)
                await self._respond(send, "models", 200, orjson.dumps(self._models()))
            elif path == "/metrics" and method == "GET":
                await self._respond(send, "metrics", 200, generate_latest(self.metrics.registry),
                                    [(b"content-type", CONTENT_TYPE_LATEST.encode())])  # fmt: skip
            elif path == "/healthz":
                await self._respond(send, "health", 200, b'{"status":"ok"}')
            elif path == "/readyz":
                checks = await self._readiness()
                ready = all(value == "ok" for value in checks.values())
                await self._respond(
                    send,
                    "ready",
                    200 if ready else 503,
                    orjson.dumps({"status": "ready" if ready else "not_ready", "checks": checks}),
                )
            else:
                raise ProxyError(404, "not_found", f"no route {method} {path}")
        except ProxyError as exc:
            if started:
                raise  # cannot happen: streams end with an error event instead
            status, body, headers = wire.error_response(exc)
            await self._respond(send, route or "other", status, body, headers)
        except Exception as exc:
            log.exception("unexpected error answering %s %s", method, path)
            if started:
                raise  # the server closes the connection: the client sees the break
            status, body, headers = wire.error_response(ProxyError(
                500, "internal_error", f"the proxy failed unexpectedly ({type(exc).__name__})",
                kind="server_error"))  # fmt: skip
            await self._respond(send, route or "other", status, body, headers)

    async def _readiness(self) -> dict[str, str]:
        """Each dependency a call needs: Redis (the guard's balances and holds) and Postgres
        (the outbox, the guard's fallback). Kafka is needed only while Postgres is down."""
        checks: dict[str, str] = {}
        try:
            assert self.redis is not None
            await asyncio.wait_for(self.redis.ping(), 1.0)
            checks["redis"] = "ok"
        except Exception as exc:  # any failure means not ready; the reason is reported
            checks["redis"] = f"failed: {type(exc).__name__}"
        try:
            assert self.pool is not None
            async with self.pool.connection(timeout=1.0) as conn:
                await conn.execute("SELECT 1")
            checks["postgres"] = "ok"
        except Exception as exc:
            checks["postgres"] = f"failed: {type(exc).__name__}"
        return checks

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self.start()
                except Exception as exc:
                    log.error("proxy failed to start: %s", exc)
                    await self.stop()  # no thread or pool may keep the process alive
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.stop()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _respond(self, send: Send, route: str, status: int, body: bytes,
                       headers: wire.Headers | None = None) -> None:  # fmt: skip
        await respond(self.metrics, send, route, status, body, headers)

    def _models(self) -> dict[str, Any]:
        return {"object": "list", "data": [
            {"id": alias, "object": "model", "created": 0, "owned_by": "creditledger"}
            for alias in sorted(self.aliases)
        ]}  # fmt: skip

    @staticmethod
    def _headers(scope: Scope) -> dict[str, str]:
        return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}

    def _authenticate(self, scope: Scope) -> None:
        self.services.authenticate(self._headers(scope).get("authorization"))

    # -- a proxied call --------------------------------------------------------------------

    async def _call(self, route: str, scope: Scope, receive: Receive, send: Send) -> None:
        if self.pipeline is None:
            raise CreditLedgerError("ProxyApp used before start()")
        headers = self._headers(scope)
        service = self.services.authenticate(headers.get("authorization"))
        ctx = from_headers(headers)
        self.services.authorize(service, ctx)
        # The call's span, in the caller's trace when it sent one: its charge carries it.
        current_trace.set(new_traceparent(headers.get(TRACEPARENT)))
        raw = await _read_body(receive)
        await self.pipeline.run(route, service.name, ctx, raw, receive, send)


async def _read_body(receive: Receive) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ProxyError(400, "client_disconnected", "the client left before sending "
                             "the whole body")  # fmt: skip
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > wire.MAX_BODY:
            raise ProxyError(413, "request_too_large",
                             f"request body over {wire.MAX_BODY} bytes")  # fmt: skip
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def serve(settings: Settings, *, log_level: str = "warning") -> None:
    import uvicorn  # only the serving process needs it

    uvicorn.run(ProxyApp(settings), host=settings.proxy.host, port=settings.proxy.port,
                loop="uvloop", http="httptools", lifespan="on", access_log=False,
                log_level=log_level)  # fmt: skip
