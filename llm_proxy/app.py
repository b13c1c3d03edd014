"""The OpenAI-compatible proxy: a plain ASGI app (run by uvicorn, see ``serve``).

A call goes: authenticate the service -> read the BillingContext headers ->
look up the model alias and its active price rule -> the guard holds the
call's estimated cost -> forward upstream with the ``openai`` SDK's async
client -> measure usage -> price it -> make the charge durable (outbox, see
:mod:`llm_proxy.charges`) -> only then finish the response.

Upstream answers pass through byte for byte (the SDK's low-level ``post`` with
``cast_to=httpx.Response`` keeps its retries and timeouts without re-parsing).
The one change to a stream: the proxy always asks for the final usage chunk,
and drops it again when the client did not ask for it.

Plain ASGI rather than a framework, because the proxy's whole budget is about
a millisecond per call and there are four routes.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx2
import openai
import orjson
import redis.asyncio as aioredis
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from psycopg_pool import AsyncConnectionPool

from contracts.commands import Charge
from contracts.fields import MODEL, NAME
from kernel.errors import CreditLedgerError, PricingError, ProxyError
from kernel.settings import ModelAlias, Settings, project_path
from llm_proxy import sse
from llm_proxy import usage as usage_mod
from llm_proxy.auth import ServiceRegistry
from llm_proxy.billing import BillingContext, from_headers, ledger_event_id
from llm_proxy.charges import ChargePath, ChargeWriter, build_charge, now_ms
from llm_proxy.guard import CreditBalanceGuard
from llm_proxy.metrics import ProxyMetrics
from llm_proxy.upstream import UpstreamClient, upstream_client
from outbox.enqueue import OutboxConflict
from pricing.rules import PriceBook, PriceRule, TokenUsage
from pricing.source import TABLE_QUERY, merge, read_yaml, table_rows_to_rules
from streams.codec import AvroCodec, load_codec

log = logging.getLogger(__name__)

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

MAX_BODY = 32 * 1024 * 1024
DONE_EVENT = b"data: [DONE]\n\n"
JSON_HEADERS = [(b"content-type", b"application/json")]


@dataclass
class Call:
    """One proxied call, from the checks to the charge."""

    route: str
    ctx: BillingContext
    alias: ModelAlias
    rule: PriceRule
    body: dict[str, Any]
    event_id: str  # the ledger's: namespaced by the calling service
    fingerprint: str  # user, model alias, scene and the body's digest
    held: bool = False
    hold_field: str | None = None  # where the guard keeps this call's hold


def call_fingerprint(route: str, ctx: BillingContext, model_alias: str, raw_body: bytes) -> str:
    """What makes two calls under one event id the same call (a retry): who pays, for
    which model and scene, and the exact request body."""
    digest = hashlib.blake2b(raw_body, digest_size=16)
    for part in (route, ctx.user_id, ctx.scene, model_alias):
        digest.update(b"\x00" + part.encode())
    return digest.hexdigest()


@dataclass
class StreamState:
    datas: list[str] = field(default_factory=list)  # the data of each event passed on
    usage: TokenUsage | None = None
    done: bool = False
    client_gone: bool = False


def error_response(exc: ProxyError) -> tuple[int, bytes, list[tuple[bytes, bytes]]]:
    headers = [*JSON_HEADERS, *((k.encode(), v.encode()) for k, v in exc.headers.items())]
    if exc.status in NOT_RETRIED:
        headers.append((b"x-should-retry", b"false"))  # the openai SDK would retry a 409
    return exc.status, orjson.dumps(exc.body()), headers


# Answers a retry cannot change: the openai SDK is told not to retry them.
NOT_RETRIED = frozenset({400, 401, 402, 403, 404, 409, 413})


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
        self._clients: dict[str, UpstreamClient] = {}
        self._tasks: set[asyncio.Task[Any]] = set()  # settlements in flight
        self._refresher: asyncio.Task[None] | None = None
        self.codec: AvroCodec | None = None
        self.pool: AsyncConnectionPool[Any] | None = None
        self.redis: aioredis.Redis | None = None
        self.guard: CreditBalanceGuard | None = None
        self.writer: ChargeWriter | None = None

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        proxy = self.settings.proxy
        if not self.aliases or not len(self.services):
            raise CreditLedgerError("proxy.models and proxy.services must not be empty: "
                                    "configure at least one model alias and one service key "
                                    "(see config.example.yaml)")  # fmt: skip
        self._check_names()
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
            self._clients[alias.alias] = upstream_client(alias, proxy)
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

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

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
        if self._tasks:  # let in-flight settlements finish; an unsettled hold is only safe
            await asyncio.wait(list(self._tasks), timeout=2.0)
        for task in list(self._tasks):
            task.cancel()
        for client in self._clients.values():
            await client.close()
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
            else:
                raise ProxyError(404, "not_found", f"no route {method} {path}")
        except ProxyError as exc:
            if started:
                raise  # cannot happen: streams end with an error event instead
            status, body, headers = error_response(exc)
            await self._respond(send, route or "other", status, body, headers)
        except Exception as exc:
            log.exception("unexpected error answering %s %s", method, path)
            if started:
                raise  # the server closes the connection: the client sees the break
            status, body, headers = error_response(ProxyError(
                500, "internal_error", f"the proxy failed unexpectedly ({type(exc).__name__})",
                kind="server_error"))  # fmt: skip
            await self._respond(send, route or "other", status, body, headers)

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
                       headers: list[tuple[bytes, bytes]] | None = None) -> None:  # fmt: skip
        self.metrics.requests.labels(route, str(status)).inc()
        await send({"type": "http.response.start", "status": status,
                    "headers": headers or JSON_HEADERS})  # fmt: skip
        await send({"type": "http.response.body", "body": body})

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
        headers = self._headers(scope)
        service = self.services.authenticate(headers.get("authorization"))
        ctx = from_headers(headers)
        self.services.authorize(service, ctx)
        raw, body = await self._read_json(receive)
        call = self._prepare(route, ctx, body, ledger_event_id(service.name, ctx.event_id), raw)
        stream = route == "chat" and body.get("stream") is True
        if not ctx.skip_charge:
            await self._hold(call)
        try:
            response = await self._upstream(call, stream)
            # The caller's own id (not the ledger's namespaced one): what a retry sends again.
            extra = [(b"x-billing-event-id", ctx.event_id.encode())]
            request_id = response.headers.get("x-request-id")
            if request_id:
                extra.append((b"x-request-id", request_id.encode()))
            if stream:
                await self._stream(call, response, receive, send, extra)
            else:
                await self._whole(call, response, send, extra)
        except BaseException:
            # Whatever went wrong (upstream, a bug, a cancelled task), no hold outlives the
            # call unless its charge was written (then settling owns it).
            await self._release(call)
            raise

    async def _read_json(self, receive: Receive) -> tuple[bytes, dict[str, Any]]:
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ProxyError(400, "client_disconnected", "the client left before sending "
                                 "the whole body")  # fmt: skip
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > MAX_BODY:
                raise ProxyError(413, "request_too_large", f"request body over {MAX_BODY} bytes")
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        raw = b"".join(chunks)
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise ProxyError(
                400, "invalid_json", f"the request body is not valid JSON: {exc}"
            ) from exc
        if not isinstance(body, dict):
            raise ProxyError(400, "invalid_request", "the request body must be a JSON object")
        return raw, body

    def _prepare(self, route: str, ctx: BillingContext, body: dict[str, Any], event_id: str,
                 raw: bytes) -> Call:  # fmt: skip
        name = body.get("model")
        if not isinstance(name, str) or not name:
            raise ProxyError(400, "invalid_request", "field 'model' is required", param="model")
        alias = self.aliases.get(name)
        if alias is None:
            known = ", ".join(sorted(self.aliases))
            raise ProxyError(404, "model_not_found", f"the model {name!r} does not exist "
                             f"(known: {known})", param="model")  # fmt: skip
        if route == "chat" and not isinstance(body.get("messages"), list):
            raise ProxyError(400, "invalid_request", "field 'messages' must be a list",
                             param="messages")  # fmt: skip
        if route == "embeddings" and not isinstance(body.get("input"), (str, list)):
            raise ProxyError(400, "invalid_request", "field 'input' must be a string or a list",
                             param="input")  # fmt: skip
        try:
            rule = self.prices.active(alias.price_rule, now_ms())
        except PricingError as exc:
            log.error("model %s cannot be priced: %s", name, exc)
            raise ProxyError(503, "pricing_unavailable", f"model {name!r} cannot be priced now",
                             kind="server_error") from exc  # fmt: skip
        return Call(route, ctx, alias, rule, body, event_id,
                    call_fingerprint(route, ctx, alias.alias, raw))  # fmt: skip

    async def _hold(self, call: Call) -> None:
        assert self.guard is not None
        default = call.alias.hold_output_tokens or self.settings.proxy.hold_output_tokens
        output = 0 if call.route == "embeddings" else usage_mod.requested_output(
            call.body, default)  # fmt: skip
        estimate = call.rule.price(TokenUsage(usage_mod.bound_prompt(call.body), output))
        started = time.perf_counter()
        try:
            remembered = None if call.ctx.event_id_generated else call.fingerprint
            decision = await self.guard.hold(call.ctx.user_id, call.event_id, estimate,
                                             remembered)  # fmt: skip
        except ProxyError as exc:
            self.metrics.guard_refusals.labels(exc.code).inc()
            if exc.code == "event_id_reused":
                self.metrics.event_id_reused.labels("guard").inc()
            raise
        finally:
            self.metrics.guard_seconds.observe(time.perf_counter() - started)
        self.metrics.guard_decisions.labels(decision.source).inc()
        call.held = decision.source != "policy"
        call.hold_field = decision.field

    async def _release(self, call: Call) -> None:
        if call.held and self.guard is not None:
            call.held = False
            await self.guard.release(call.ctx.user_id, call.event_id, call.hold_field)

    async def _upstream(self, call: Call, stream: bool) -> httpx2.Response:
        body = dict(call.body)
        body["model"] = call.alias.upstream_model
        if stream:
            options = body.get("stream_options")
            body["stream_options"] = {**(options if isinstance(options, dict) else {}),
                                      "include_usage": True}  # fmt: skip
        path = "/chat/completions" if call.route == "chat" else "/embeddings"
        client = self._clients[call.alias.alias]
        model = call.alias.alias
        try:
            response: httpx2.Response = await client.post(
                path, cast_to=httpx2.Response, content=orjson.dumps(body), stream=True,
                options={"headers": {"Content-Type": "application/json"}},
            )  # fmt: skip
            return response
        except openai.APIStatusError as exc:
            self.metrics.upstream_errors.labels(model, str(exc.status_code)).inc()
            passed = {k: v for k in ("retry-after", "retry-after-ms", "x-request-id")
                      if (v := exc.response.headers.get(k))}  # fmt: skip
            if exc.status_code == 429:
                # Rate limited: the client's SDK backs off by Retry-After and retries.
                raise _passthrough(exc, "rate_limit_exceeded", passed) from exc
            if 400 <= exc.status_code < 500 and exc.status_code not in (401, 403):
                # The client's request was wrong (e.g. a bad parameter): say what upstream said.
                raise _passthrough(exc, "upstream_rejected", passed) from exc
            raise ProxyError(502, "upstream_error", f"upstream answered {exc.status_code}",
                             kind="server_error", headers=passed) from exc  # fmt: skip
        except openai.APITimeoutError as exc:
            self.metrics.upstream_errors.labels(model, "timeout").inc()
            raise ProxyError(504, "upstream_timeout", "upstream did not answer in time",
                             kind="server_error") from exc  # fmt: skip
        except openai.APIConnectionError as exc:
            self.metrics.upstream_errors.labels(model, "connection").inc()
            raise ProxyError(502, "upstream_unreachable", "upstream could not be reached",
                             kind="server_error") from exc  # fmt: skip

    async def _whole(self, call: Call, response: httpx2.Response, send: Send,
                     extra: list[tuple[bytes, bytes]]) -> None:  # fmt: skip
        started = time.perf_counter()
        try:
            data = await response.aread()
        except httpx2.HTTPError as exc:
            await self._release(call)
            raise ProxyError(502, "upstream_error", "upstream answer broke off",
                             kind="server_error") from exc  # fmt: skip
        finally:
            await response.aclose()
        self.metrics.upstream_seconds.labels(call.alias.alias).observe(
            time.perf_counter() - started)  # fmt: skip
        try:
            answer = orjson.loads(data)
        except orjson.JSONDecodeError:
            answer = {}
        usage = usage_mod.from_response(answer.get("usage") if isinstance(answer, dict) else None)
        estimated = usage is None
        if usage is None:
            self.metrics.estimated.labels("no_usage").inc()
            usage = usage_mod.estimate(call.body, _answer_text(answer))
        await self._charge(call, usage, estimated, _upstream_model(answer, call.alias))
        await self._respond(send, call.route, 200, data, [*JSON_HEADERS, *extra])

    async def _stream(self, call: Call, response: httpx2.Response, receive: Receive,
                      send: Send, extra: list[tuple[bytes, bytes]]) -> None:  # fmt: skip
        started = time.perf_counter()
        options = call.body.get("stream_options")
        wants_usage = isinstance(options, dict) and options.get("include_usage") is True
        state = StreamState()
        content_type = response.headers.get("content-type", "text/event-stream").encode()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", content_type), (b"cache-control", b"no-cache"),
                                *extra]})  # fmt: skip
        pump = asyncio.ensure_future(self._pump(response, send, state, wants_usage))
        gone = asyncio.ensure_future(_disconnected(receive))
        try:
            await asyncio.wait({pump, gone}, return_when=asyncio.FIRST_COMPLETED)
            if not pump.done():
                pump.cancel()
                state.client_gone = True
            with contextlib.suppress(asyncio.CancelledError, httpx2.HTTPError, OSError):
                await pump
        finally:
            gone.cancel()
            await response.aclose()
        self.metrics.upstream_seconds.labels(call.alias.alias).observe(
            time.perf_counter() - started)  # fmt: skip
        usage, estimated = state.usage, state.usage is None
        if usage is None:
            self.metrics.estimated.labels("client_gone" if state.client_gone else "no_usage").inc()
            usage = usage_mod.estimate(call.body, _streamed_text(state.datas))
        finish, status = DONE_EVENT, "200"
        if state.client_gone:
            finish, status = b"", "499"
        elif not state.done:
            # Upstream broke off: the answer is incomplete, and the client must be able to
            # tell (an error event makes the openai SDK raise; it is still charged).
            self.metrics.upstream_errors.labels(call.alias.alias, "incomplete_stream").inc()
            finish, status = (
                _error_event(
                    ProxyError(
                        502,
                        "upstream_incomplete",
                        "upstream broke off mid-answer: the answer is "
                        "incomplete (it is charged as estimated)",
                        kind="server_error",
                    )
                ),
                "502",
            )
        try:
            await self._charge(call, usage, estimated, _streamed_model(state.datas, call.alias))
        except ProxyError as exc:
            # Headers are long gone: end the stream with the error instead of [DONE], so the
            # client sees an incomplete answer rather than a clean one that was never recorded.
            finish, status = _error_event(exc), str(exc.status)
        self.metrics.requests.labels(call.route, status).inc()
        with contextlib.suppress(OSError):
            # The charge is durable before the stream's end reaches the client.
            await send({"type": "http.response.body", "body": finish, "more_body": False})

    @staticmethod
    async def _pump(response: httpx2.Response, send: Send, state: StreamState,
                    wants_usage: bool) -> None:  # fmt: skip
        decoder = sse.SSEDecoder()
        chunks = response.aiter_bytes()
        while True:
            try:
                chunk = await chunks.__anext__()
                items = decoder.feed(chunk)
            except StopAsyncIteration:
                items, chunk = decoder.close(), b""
            out = [item.encode() for item in items if _forward(item, state, wants_usage)]
            if out:
                await send({"type": "http.response.body", "body": b"".join(out),
                            "more_body": True})  # fmt: skip
            if not chunk:
                return

    async def _charge(self, call: Call, usage: TokenUsage, estimated: bool,
                      upstream_model: str) -> None:  # fmt: skip
        if call.ctx.skip_charge:
            self.metrics.charges.labels("skipped").inc()
            return
        assert self.guard is not None and self.writer is not None
        charge = build_charge(call.ctx, event_id=call.event_id, model_alias=call.alias.alias,
                              upstream_model=upstream_model, usage=usage, estimated=estimated,
                              rule=call.rule, occurred_at_ms=now_ms(),
                              producer=self.settings.proxy.producer_name)  # fmt: skip
        try:
            path = await self.writer.write(charge, call.fingerprint)
        except OutboxConflict as exc:
            # The guard could not tell (Redis was down, or forgot the id): the id belongs to
            # another call, so this one is refused, never served for free.
            self.metrics.event_id_reused.labels("outbox").inc()
            await self._release(call)
            raise ProxyError(409, "event_id_reused", "X-Billing-Event-Id was used before "
                             "for a different call: send a new id for a new call",
                             param="X-Billing-Event-Id") from exc  # fmt: skip
        except OSError as exc:
            log.critical("charge %s could not be recorded anywhere (outbox, Kafka and spool "
                         "failed: %s)", charge.event_id, exc)  # fmt: skip
            await self._release(call)
            raise ProxyError(500, "charge_not_recorded", "the call finished but its charge "
                             "could not be recorded", kind="server_error") from exc  # fmt: skip
        self.metrics.charges.labels(path).inc()
        if path != "duplicate":
            self.metrics.charged_micro.labels(call.alias.alias).inc(charge.amount_micro)
        # The hold is settled after the response: the estimate it still holds until then
        # only errs on the safe side, and settling only rewrites a hold that still exists,
        # so a projector that folded the charge meanwhile cannot get it held again.
        call.held = False  # from here on, settling owns the hold (even if the reply fails)
        self._spawn(self._settle(call, charge, path))

    async def _settle(self, call: Call, charge: Charge, path: ChargePath) -> None:
        assert self.guard is not None
        recorded = path != "duplicate"
        await self.guard.settle(charge.user_id, charge.event_id, call.hold_field,
                                charge.amount_micro, recorded=recorded)  # fmt: skip
        if not recorded and call.hold_field == charge.event_id:
            # A duplicate that held under the event id itself: the first attempt left no hold
            # in Redis (served while Redis was down, or its record expired), so the projector
            # deletes this one only if it has not folded that charge yet.
            await self.guard.release_if_folded(charge.user_id, charge.event_id)


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


def _passthrough(exc: openai.APIStatusError, default_code: str,
                 headers: dict[str, str]) -> ProxyError:  # fmt: skip
    body = exc.body if isinstance(exc.body, dict) else {}
    error = body.get("error", body) if isinstance(body, dict) else {}
    error = error if isinstance(error, dict) else {}
    message, code, kind = error.get("message"), error.get("code"), error.get("type")
    return ProxyError(exc.status_code, str(code or default_code),
                      str(message or f"upstream refused the request ({exc.status_code})"),
                      param=error.get("param"), headers=headers,
                      kind=str(kind or "invalid_request_error"))  # fmt: skip


def _forward(item: sse.Item, state: StreamState, wants_usage: bool) -> bool:
    """Note what ``item`` tells (usage, the end); whether the client gets it."""
    if isinstance(item, sse.Comment):
        return True  # keep-alives keep the client's connection alive too
    data = item.data
    if data == "[DONE]":
        state.done = True
        return False  # sent by the proxy itself, once the charge is durable
    if '"usage"' in data:
        with contextlib.suppress(orjson.JSONDecodeError):
            parsed = orjson.loads(data)
            if isinstance(parsed, dict):
                found = usage_mod.from_response(parsed.get("usage"))
                if found is not None:
                    state.usage = found
                    if not wants_usage and parsed.get("choices") == []:
                        return False  # the usage chunk asked for on the client's behalf
    state.datas.append(data)
    return True


def _error_event(exc: ProxyError) -> bytes:
    """An error as the last event of a stream: the openai SDK raises APIError on it."""
    return sse.Event(orjson.dumps(exc.body()).decode()).encode()


def _event_data(datas: list[str]) -> list[dict[str, Any]]:
    out = []
    for data in datas:
        with contextlib.suppress(orjson.JSONDecodeError):
            parsed = orjson.loads(data)
            if isinstance(parsed, dict):
                out.append(parsed)
    return out


def _streamed_text(datas: list[str]) -> str:
    """The text the client actually received: content, reasoning and tool-call arguments."""
    parts: list[str] = []
    for data in _event_data(datas):
        for choice in data.get("choices") or []:
            delta = choice.get("delta") if isinstance(choice, dict) else None
            if not isinstance(delta, dict):
                continue
            for key in ("content", "reasoning_content", "refusal"):
                if isinstance(delta.get(key), str):
                    parts.append(delta[key])
            for tool in delta.get("tool_calls") or []:
                function = tool.get("function") if isinstance(tool, dict) else None
                if isinstance(function, dict) and isinstance(function.get("arguments"), str):
                    parts.append(function["arguments"])
    return "".join(parts)


def _streamed_model(datas: list[str], alias: ModelAlias) -> str:
    for data in _event_data(datas[:1]):
        if MODEL.ok(data.get("model")):
            return str(data["model"])
    return alias.upstream_model


def _answer_text(answer: Any) -> str:
    if not isinstance(answer, dict):
        return ""
    parts: list[str] = []
    for choice in answer.get("choices") or []:
        message = choice.get("message") if isinstance(choice, dict) else None
        if isinstance(message, dict) and isinstance(message.get("content"), str):
            parts.append(message["content"])
    return "".join(parts)


def _upstream_model(answer: Any, alias: ModelAlias) -> str:
    """The model upstream says it used, when it fits the field rule; else the configured one
    (a charge whose model the fold refused would be a free call)."""
    if isinstance(answer, dict) and MODEL.ok(answer.get("model")):
        return str(answer["model"])
    return alias.upstream_model


def serve(settings: Settings, *, log_level: str = "warning") -> None:
    import uvicorn  # only the serving process needs it

    uvicorn.run(ProxyApp(settings), host=settings.proxy.host, port=settings.proxy.port,
                loop="uvloop", http="httptools", lifespan="on", access_log=False,
                log_level=log_level)  # fmt: skip
