"""One proxied call: hold -> upstream -> usage -> price -> charge -> settle.

:class:`CallPipeline` is given its ports (:mod:`llm_proxy.ports`): the guard, the charge
sink, the upstream and the clock. The proxy passes the real ones; the unit tests pass
in-memory ones and run the whole path in process.

The order is the money argument:

- the guard holds the call's estimated cost before anything goes upstream, and refuses
  (402) when the user's available balance is not positive, or (409) when the event id
  was served before for another call;
- the charge is made durable (outbox, Kafka or spool) *before* the answer's end reaches
  the client: a whole answer is sent only after it, a stream's ``[DONE]`` too;
- whatever fails before the charge is written releases the hold; once it is written,
  settling owns the hold, which stays (now at the charged amount) until the Redis
  projector folds the charge.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from contracts.commands import Charge
from kernel.errors import OutboxConflict, PricingError, ProxyError
from kernel.settings import ModelAlias, Settings
from llm_proxy import sse, wire
from llm_proxy import usage as usage_mod
from llm_proxy.billing import BillingContext, ledger_event_id
from llm_proxy.metrics import ProxyMetrics
from llm_proxy.ports import (
    ChargePath,
    ChargeSink,
    Clock,
    Guard,
    Upstream,
    UpstreamAnswer,
    UpstreamBroke,
)
from pricing.rules import PriceBook, PriceRule, TokenUsage

log = logging.getLogger(__name__)

Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


def now_ms() -> int:
    return int(time.time() * 1000)


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
    service: str = ""  # the calling service (a metrics label)
    started: float = field(default_factory=time.perf_counter)


def build_charge(call: Call, usage: TokenUsage, estimated: bool, upstream_model: str,
                 occurred_at_ms: int, producer: str) -> Charge:  # fmt: skip
    """The call's charge, priced by its rule: it carries the rule id and version and the
    usage, so the fold never looks anything up."""
    ctx = call.ctx
    return Charge(
        event_id=call.event_id, user_id=ctx.user_id, scene=ctx.scene,
        request_id=ctx.request_id, conversation_id=ctx.conversation_id,
        model_alias=call.alias.alias, upstream_model=upstream_model,
        input_tokens=usage.input_tokens, output_tokens=usage.output_tokens,
        cached_tokens=usage.cached_tokens, reasoning_tokens=usage.reasoning_tokens,
        usage_estimated=estimated, price_rule_id=call.rule.rule_id,
        price_rule_version=call.rule.version, amount_micro=call.rule.price(usage),
        occurred_at_ms=occurred_at_ms, producer=producer,
    )  # fmt: skip


async def respond(metrics: ProxyMetrics, send: Send, route: str, status: int, body: bytes,
                  headers: wire.Headers | None = None) -> None:  # fmt: skip
    metrics.requests.labels(route, str(status)).inc()
    await send({"type": "http.response.start", "status": status,
                "headers": headers or wire.JSON_HEADERS})  # fmt: skip
    await send({"type": "http.response.body", "body": body})


class CallPipeline:
    def __init__(self, settings: Settings, *, guard: Guard, charges: ChargeSink,
                 upstream: Upstream, prices: Callable[[], PriceBook], metrics: ProxyMetrics,
                 clock: Clock = now_ms) -> None:  # fmt: skip
        self.settings = settings
        self.aliases = {m.alias: m for m in settings.proxy.models}
        self.guard = guard
        self.charges = charges
        self.upstream = upstream
        self.prices = prices
        self.metrics = metrics
        self.clock = clock
        self._tasks: set[asyncio.Task[Any]] = set()  # settlements in flight

    async def run(self, route: str, service: str, ctx: BillingContext, raw: bytes,
                  receive: Receive, send: Send) -> None:  # fmt: skip
        """Serve one call of ``service`` whose body is ``raw``, and charge it."""
        body = wire.parse_body(raw)
        call = self.prepare(route, ctx, body, ledger_event_id(service, ctx.event_id), raw)
        call.service = service
        in_flight = self.metrics.in_flight.labels(service)
        in_flight.inc()
        try:
            await self._serve(call, route, ctx, body, receive, send)
        finally:
            in_flight.dec()

    async def _serve(self, call: Call, route: str, ctx: BillingContext, body: dict[str, Any],
                     receive: Receive, send: Send) -> None:  # fmt: skip
        stream = wire.is_stream(route, body)
        if not ctx.skip_charge:
            await self._hold(call)
        try:
            request = wire.upstream_body(body, call.alias, stream)
            answer = await self.upstream.post(call.alias, route, request)
            # The caller's own id (not the ledger's namespaced one): what a retry sends again.
            extra = [(b"x-billing-event-id", ctx.event_id.encode())]
            request_id = answer.headers.get("x-request-id")
            if request_id:
                extra.append((b"x-request-id", request_id.encode()))
            if stream:
                await self._stream(call, answer, receive, send, extra)
            else:
                await self._whole(call, answer, send, extra)
        except BaseException:
            # Whatever went wrong (upstream, a bug, a cancelled task), no hold outlives the
            # call unless its charge was written (then settling owns it).
            await self._release(call)
            raise

    def prepare(self, route: str, ctx: BillingContext, body: dict[str, Any], event_id: str,
                raw: bytes) -> Call:  # fmt: skip
        alias = wire.check_request(route, body, self.aliases)
        try:
            rule = self.prices().active(alias.price_rule, self.clock())
        except PricingError as exc:
            log.error("model %s cannot be priced: %s", alias.alias, exc)
            raise ProxyError(503, "pricing_unavailable", f"model {alias.alias!r} cannot be "
                             "priced now", kind="server_error") from exc  # fmt: skip
        return Call(route, ctx, alias, rule, body, event_id,
                    wire.call_fingerprint(route, ctx, alias.alias, raw))  # fmt: skip

    # -- the hold --------------------------------------------------------------------------

    async def _hold(self, call: Call) -> None:
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
        if call.held:
            call.held = False
            await self.guard.release(call.ctx.user_id, call.event_id, call.hold_field)

    # -- the answer ------------------------------------------------------------------------

    async def _whole(self, call: Call, answer: UpstreamAnswer, send: Send,
                     extra: wire.Headers) -> None:  # fmt: skip
        started = time.perf_counter()
        try:
            data = await answer.read()
        except UpstreamBroke as exc:
            raise ProxyError(502, "upstream_error", "upstream answer broke off",
                             kind="server_error") from exc  # fmt: skip
        finally:
            await answer.close()
        self.metrics.upstream_seconds.labels(call.alias.alias).observe(
            time.perf_counter() - started)  # fmt: skip
        parsed = wire.parse_answer(data)
        usage = usage_mod.from_response(parsed.get("usage"))
        estimated = usage is None
        if usage is None:
            self.metrics.estimated.labels("no_usage").inc()
            usage = usage_mod.estimate(call.body, wire.answer_text(parsed))
        await self._charge(call, usage, estimated, wire.answer_model(parsed, call.alias))
        self._first_byte(call)
        await respond(self.metrics, send, call.route, 200, data, [*wire.JSON_HEADERS, *extra])

    def _first_byte(self, call: Call) -> None:
        self.metrics.first_byte_seconds.labels(call.service, call.alias.alias).observe(
            time.perf_counter() - call.started)  # fmt: skip

    async def _stream(self, call: Call, answer: UpstreamAnswer, receive: Receive, send: Send,
                      extra: wire.Headers) -> None:  # fmt: skip
        started = time.perf_counter()
        state = wire.StreamState()
        content_type = answer.headers.get("content-type", "text/event-stream").encode()
        self._first_byte(call)
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", content_type), (b"cache-control", b"no-cache"),
                                *extra]})  # fmt: skip
        pump = asyncio.ensure_future(_pump(answer, send, state, wire.wants_usage(call.body)))
        gone = asyncio.ensure_future(_disconnected(receive))
        try:
            await asyncio.wait({pump, gone}, return_when=asyncio.FIRST_COMPLETED)
            if not pump.done():
                pump.cancel()
                state.client_gone = True
            with contextlib.suppress(asyncio.CancelledError, UpstreamBroke, OSError,
                                     *self.upstream.broken):  # fmt: skip
                await pump
        finally:
            gone.cancel()
            await answer.close()
        self.metrics.upstream_seconds.labels(call.alias.alias).observe(
            time.perf_counter() - started)  # fmt: skip
        finish, status = await self._end_stream(call, state)
        self.metrics.requests.labels(call.route, status).inc()
        with contextlib.suppress(OSError):
            # The charge is durable before the stream's end reaches the client.
            await send({"type": "http.response.body", "body": finish, "more_body": False})

    async def _end_stream(self, call: Call, state: wire.StreamState) -> tuple[bytes, str]:
        """Charge what was streamed; the stream's last bytes and the status to count."""
        usage, estimated = state.usage, state.usage is None
        if usage is None:
            self.metrics.estimated.labels("client_gone" if state.client_gone else "no_usage").inc()
            usage = usage_mod.estimate(call.body, wire.streamed_text(state.datas))
        finish, status = wire.DONE_EVENT, "200"
        if state.client_gone:
            finish, status = b"", "499"
        elif not state.done:
            # Upstream broke off: the answer is incomplete, and the client must be able to
            # tell (an error event makes the openai SDK raise; it is still charged).
            self.metrics.upstream_errors.labels(call.alias.alias, "incomplete_stream").inc()
            finish, status = wire.error_event(ProxyError(
                502, "upstream_incomplete", "upstream broke off mid-answer: the answer is "
                "incomplete (it is charged as estimated)", kind="server_error")), "502"  # fmt: skip
        try:
            await self._charge(call, usage, estimated, wire.streamed_model(state.datas, call.alias))
        except ProxyError as exc:
            # Headers are long gone: end the stream with the error instead of [DONE], so the
            # client sees an incomplete answer rather than a clean one that was never recorded.
            finish, status = wire.error_event(exc), str(exc.status)
        return finish, status

    # -- the charge ------------------------------------------------------------------------

    async def _charge(self, call: Call, usage: TokenUsage, estimated: bool,
                      upstream_model: str) -> None:  # fmt: skip
        if call.ctx.skip_charge:
            self.metrics.charges.labels("skipped").inc()
            return
        charge = build_charge(call, usage, estimated, upstream_model, self.clock(),
                              self.settings.proxy.producer_name)  # fmt: skip
        try:
            path = await self.charges.write(charge, call.fingerprint)
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
            labels = (call.service, call.alias.alias)
            self.metrics.charged_micro.labels(*labels).inc(charge.amount_micro)
            for kind, count in (("input", usage.input_tokens), ("cached", usage.cached_tokens),
                                ("output", usage.output_tokens),
                                ("reasoning", usage.reasoning_tokens)):  # fmt: skip
                if count:
                    self.metrics.tokens.labels(*labels, kind).inc(count)
        # The hold is settled after the response: the estimate it still holds until then
        # only errs on the safe side, and settling only rewrites a hold that still exists,
        # so a projector that folded the charge meanwhile cannot get it held again.
        call.held = False  # from here on, settling owns the hold (even if the reply fails)
        self._spawn(self._settle(call, charge, path))

    async def _settle(self, call: Call, charge: Charge, path: ChargePath) -> None:
        recorded = path != "duplicate"
        await self.guard.settle(charge.user_id, charge.event_id, call.hold_field,
                                charge.amount_micro, recorded=recorded)  # fmt: skip
        if not recorded and call.hold_field == charge.event_id:
            # A duplicate that held under the event id itself: the first attempt left no hold
            # in Redis (served while Redis was down, or its record expired), so the projector
            # deletes this one only if it has not folded that charge yet.
            await self.guard.release_if_folded(charge.user_id, charge.event_id)

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def drain(self, timeout_s: float = 2.0) -> None:
        """Let the settlements in flight finish (an unsettled hold is only safe), then stop."""
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=timeout_s)
        for task in list(self._tasks):
            task.cancel()


async def _pump(answer: UpstreamAnswer, send: Send, state: wire.StreamState,
                wants_usage: bool) -> None:  # fmt: skip
    """Pass upstream's events on as they come, noting usage and the end."""
    decoder = sse.SSEDecoder()
    chunks = answer.chunks()
    while True:
        try:
            chunk = await chunks.__anext__()
            items = decoder.feed(chunk)
        except StopAsyncIteration:
            items, chunk = decoder.close(), b""
        out = [item.encode() for item in items if wire.forward(item, state, wants_usage)]
        if out:
            await send({"type": "http.response.body", "body": b"".join(out), "more_body": True})
        if not chunk:
            return


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
