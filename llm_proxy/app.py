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
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx2
import openai
import orjson
import redis.asyncio as aioredis
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from psycopg_pool import AsyncConnectionPool

from agents.domain import Charge
from creditledger.errors import CreditLedgerError, PricingError, ProxyError
from creditledger.settings import ModelAlias, Settings, project_path
from llm_proxy import usage as usage_mod
from llm_proxy.auth import ServiceRegistry
from llm_proxy.billing import BillingContext, from_headers
from llm_proxy.charges import ChargePath, ChargeWriter, build_charge, now_ms
from llm_proxy.guard import CreditBalanceGuard
from llm_proxy.metrics import ProxyMetrics
from llm_proxy.price_source import TABLE_QUERY, merge, read_yaml, table_rows_to_rules
from llm_proxy.pricing import PriceBook, PriceRule, TokenUsage
from llm_proxy.upstream import UpstreamClient, upstream_client
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
    held: bool = False


@dataclass
class StreamState:
    events: list[bytes] = field(default_factory=list)
    usage: TokenUsage | None = None
    done: bool = False
    client_gone: bool = False


def error_response(exc: ProxyError) -> tuple[int, bytes]:
    return exc.status, orjson.dumps(exc.body())


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
        try:
            if route and method == "POST":
                await self._call(route, scope, receive, send)
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
            status, body = error_response(exc)
            await self._respond(send, route or "other", status, body)

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
        body = await self._read_json(receive)
        call = self._prepare(route, ctx, body)
        stream = route == "chat" and body.get("stream") is True
        if not ctx.skip_charge:
            await self._hold(call)
        try:
            response = await self._upstream(call, stream)
        except ProxyError:
            await self._release(call)
            raise
        extra = [(b"x-billing-event-id", ctx.event_id.encode())]
        if stream:
            await self._stream(call, response, receive, send, extra)
        else:
            await self._whole(call, response, send, extra)

    async def _read_json(self, receive: Receive) -> dict[str, Any]:
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
        try:
            body = orjson.loads(b"".join(chunks))
        except orjson.JSONDecodeError as exc:
            raise ProxyError(
                400, "invalid_json", f"the request body is not valid JSON: {exc}"
            ) from exc
        if not isinstance(body, dict):
            raise ProxyError(400, "invalid_request", "the request body must be a JSON object")
        return body

    def _prepare(self, route: str, ctx: BillingContext, body: dict[str, Any]) -> Call:
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
        return Call(route, ctx, alias, rule, body)

    async def _hold(self, call: Call) -> None:
        assert self.guard is not None
        output = 0 if call.route == "embeddings" else usage_mod.requested_output(
            call.body, self.settings.proxy.hold_output_tokens)  # fmt: skip
        estimate = call.rule.price(TokenUsage(usage_mod.bound_prompt(call.body), output))
        started = time.perf_counter()
        try:
            decision = await self.guard.hold(call.ctx.user_id, call.ctx.event_id, estimate)
        except ProxyError as exc:
            self.metrics.guard_refusals.labels(exc.code).inc()
            raise
        finally:
            self.metrics.guard_seconds.observe(time.perf_counter() - started)
        self.metrics.guard_decisions.labels(decision.source).inc()
        call.held = decision.source != "policy"

    async def _release(self, call: Call) -> None:
        if call.held and self.guard is not None:
            await self.guard.release(call.ctx.user_id, call.ctx.event_id)

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
            if 400 <= exc.status_code < 500 and exc.status_code not in (401, 403, 429):
                # The client's request was wrong (e.g. a bad parameter): say what upstream said.
                raise _passthrough(exc) from exc
            raise ProxyError(502, "upstream_error", f"upstream answered {exc.status_code}",
                             kind="server_error") from exc  # fmt: skip
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
            usage = usage_mod.estimate(call.body, _streamed_text(state.events))
        finish = DONE_EVENT if state.done else b""
        status = "200" if not state.client_gone else "499"
        try:
            await self._charge(call, usage, estimated, _streamed_model(state.events, call.alias))
        except ProxyError as exc:
            # Headers are long gone: end the stream without [DONE], so the client sees an
            # incomplete answer rather than a clean one that was never recorded.
            finish, status = b"", str(exc.status)
        self.metrics.requests.labels(call.route, status).inc()
        with contextlib.suppress(OSError):
            # The charge is durable before the stream's end reaches the client.
            await send({"type": "http.response.body", "body": finish, "more_body": False})

    @staticmethod
    async def _pump(response: httpx2.Response, send: Send, state: StreamState,
                    wants_usage: bool) -> None:  # fmt: skip
        pending = b""
        async for chunk in response.aiter_bytes():
            pending += chunk
            out: list[bytes] = []
            while True:
                end = pending.find(b"\n\n")
                if end < 0:
                    break
                event, pending = pending[: end + 2], pending[end + 2 :]
                if event.startswith(b"data: [DONE]"):
                    state.done = True
                    continue
                if b'"usage"' in event and b'"usage":null' not in event:
                    found = _event_usage(event)
                    if found is not None:
                        state.usage = found
                        if not wants_usage and b'"choices":[]' in event.replace(b" ", b""):
                            continue  # the usage chunk we asked for on the client's behalf
                state.events.append(event)
                out.append(event)
            if out:
                await send({"type": "http.response.body", "body": b"".join(out),
                            "more_body": True})  # fmt: skip

    async def _charge(self, call: Call, usage: TokenUsage, estimated: bool,
                      upstream_model: str) -> None:  # fmt: skip
        if call.ctx.skip_charge:
            self.metrics.charges.labels("skipped").inc()
            return
        assert self.guard is not None and self.writer is not None
        charge = build_charge(call.ctx, model_alias=call.alias.alias,
                              upstream_model=upstream_model, usage=usage, estimated=estimated,
                              rule=call.rule, occurred_at_ms=now_ms(),
                              producer=self.settings.proxy.producer_name)  # fmt: skip
        try:
            path = await self.writer.write(charge)
        except OSError as exc:
            log.critical("charge %s could not be recorded anywhere (outbox, Kafka and spool "
                         "failed: %s)", charge.event_id, exc)  # fmt: skip
            self._spawn(self._settle(charge, "failed"))
            raise ProxyError(500, "charge_not_recorded", "the call finished but its charge "
                             "could not be recorded", kind="server_error") from exc  # fmt: skip
        self.metrics.charges.labels(path).inc()
        if path != "duplicate":
            self.metrics.charged_micro.labels(call.alias.alias).inc(charge.amount_micro)
        # The hold is settled after the response: the estimate it still holds until then
        # only errs on the safe side, and settling only rewrites a hold that still exists,
        # so a projector that folded the charge meanwhile cannot get it held again.
        self._spawn(self._settle(charge, path))

    async def _settle(self, charge: Charge, path: ChargePath | Literal["failed"]) -> None:
        assert self.guard is not None
        await self.guard.settle(charge.user_id, charge.event_id, charge.amount_micro)
        if path == "duplicate":
            # Already charged under this event_id: this retry adds nothing. Its hold replaced
            # the first call's; keep it until the projector folds the first charge, unless
            # that has happened already.
            await self.guard.release_if_folded(charge.user_id, charge.event_id)


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


def _passthrough(exc: openai.APIStatusError) -> ProxyError:
    body = exc.body if isinstance(exc.body, dict) else {}
    error = body.get("error", body) if isinstance(body, dict) else {}
    message = error.get("message") if isinstance(error, dict) else None
    code = error.get("code") if isinstance(error, dict) else None
    return ProxyError(exc.status_code, str(code or "upstream_rejected"),
                      str(message or f"upstream refused the request ({exc.status_code})"),
                      param=error.get("param") if isinstance(error, dict) else None)  # fmt: skip


def _event_usage(event: bytes) -> TokenUsage | None:
    for data in _event_data([event]):
        return usage_mod.from_response(data.get("usage"))
    return None


def _event_data(events: list[bytes]) -> list[dict[str, Any]]:
    out = []
    for event in events:
        for line in event.split(b"\n"):
            if line.startswith(b"data:"):
                with contextlib.suppress(orjson.JSONDecodeError):
                    data = orjson.loads(line[5:])
                    if isinstance(data, dict):
                        out.append(data)
    return out


def _streamed_text(events: list[bytes]) -> str:
    """The text the client actually received: content, reasoning and tool-call arguments."""
    parts: list[str] = []
    for data in _event_data(events):
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


def _streamed_model(events: list[bytes], alias: ModelAlias) -> str:
    for data in _event_data(events[:1]):
        if isinstance(data.get("model"), str):
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
    if isinstance(answer, dict) and isinstance(answer.get("model"), str):
        return str(answer["model"])
    return alias.upstream_model


def serve(settings: Settings, *, log_level: str = "warning") -> None:
    import uvicorn  # only the serving process needs it

    uvicorn.run(ProxyApp(settings), host=settings.proxy.host, port=settings.proxy.port,
                loop="uvloop", http="httptools", lifespan="on", access_log=False,
                log_level=log_level)  # fmt: skip
