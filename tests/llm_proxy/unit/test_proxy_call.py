"""The call path in process: CallPipeline with in-memory ports (guard, charge sink,
upstream, clock). The same path runs against real Redis, Postgres, Kafka and an HTTP
upstream in tests/llm_proxy/integration/; here every ordering is cheap to set up."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from typing import Any

import orjson
import pytest

from contracts.commands import Charge
from kernel.errors import OutboxConflict, ProxyError
from kernel.settings import ModelAlias, Settings, load_settings
from llm_proxy.billing import BillingContext
from llm_proxy.call import CallPipeline
from llm_proxy.metrics import ProxyMetrics
from llm_proxy.ports import ChargePath, Decision, UpstreamBroke
from pricing.rules import PriceBook, parse_price_rules

NOW_MS = 1_780_000_000_000
PRICES = parse_price_rules([{"id": "std", "versions": [{
    "version": 3, "effective_from": "2026-01-01T00:00:00Z", "input": "1",
    "output": "2"}]}])  # fmt: skip


class MemoryGuard:
    """Holds against a fixed balance per user, as the Redis guard does: a call is let in
    while balance minus holds is positive."""

    def __init__(self, balances: dict[str, int]) -> None:
        self.balances = balances
        self.holds: dict[tuple[str, str], int] = {}
        self.settled: list[tuple[str, int, bool]] = []

    def held(self, user: str) -> int:
        return sum(amount for (who, _), amount in self.holds.items() if who == user)

    async def hold(self, user_id: str, event_id: str, amount_micro: int,
                   fingerprint: str | None) -> Decision:  # fmt: skip
        balance, held = self.balances.get(user_id, 0), self.held(user_id)
        if balance - held <= 0:
            raise ProxyError(402, "insufficient_credits", "insufficient credits",
                             kind="insufficient_quota")  # fmt: skip
        self.holds[(user_id, event_id)] = amount_micro
        return Decision(True, "redis", balance, held, event_id)

    async def release(self, user_id: str, event_id: str, field: str | None) -> None:
        self.holds.pop((user_id, field or event_id), None)

    async def settle(self, user_id: str, event_id: str, field: str | None, amount_micro: int,
                     *, recorded: bool) -> None:  # fmt: skip
        self.settled.append((event_id, amount_micro, recorded))
        key = (user_id, field or event_id)
        if recorded and key in self.holds:
            self.holds[key] = amount_micro  # held until the projector folds the charge
        else:
            self.holds.pop(key, None)

    async def release_if_folded(self, user_id: str, event_id: str) -> None:
        pass


class MemorySink:
    """The outbox's rule: one event per id; the same fingerprint again is a duplicate."""

    def __init__(self) -> None:
        self.charges: dict[str, tuple[Charge, str]] = {}
        self.fail: OSError | None = None

    async def write(self, charge: Charge, fingerprint: str) -> ChargePath:
        if self.fail is not None:
            raise self.fail
        if charge.event_id in self.charges:
            if self.charges[charge.event_id][1] == fingerprint:
                return "duplicate"
            raise OutboxConflict(charge.event_id, "credit.charge.requested")
        self.charges[charge.event_id] = (charge, fingerprint)
        return "outbox"


class Answer:
    def __init__(self, parts: list[bytes], broken: bool = False) -> None:
        self.parts = parts
        self.broken = broken
        self.closed = False

    @property
    def headers(self) -> Mapping[str, str]:
        return {"x-request-id": "up-1", "content-type": "text/event-stream"}

    async def read(self) -> bytes:
        if self.broken:
            raise UpstreamBroke("reset")
        return b"".join(self.parts)

    async def chunks(self) -> AsyncIterator[bytes]:
        for part in self.parts:
            yield part
        if self.broken:
            raise TransportError("reset")  # the upstream port names it as a broken read

    async def close(self) -> None:
        self.closed = True


class TransportError(Exception):
    """What a transport of its own raises when an answer breaks off mid-read."""


class FakeUpstream:
    broken: tuple[type[Exception], ...] = (TransportError,)

    def __init__(self, answer: Answer | ProxyError) -> None:
        self.answer = answer
        self.requests: list[dict[str, Any]] = []

    async def post(self, alias: ModelAlias, route: str, body: bytes) -> Answer:
        self.requests.append(orjson.loads(body))
        if isinstance(self.answer, ProxyError):
            raise self.answer
        return self.answer


def settings() -> Settings:
    return load_settings(proxy={"models": [{
        "alias": "chat", "upstream_base_url": "http://127.0.0.1:9/v1",
        "upstream_model": "up-model", "price_rule": "std",
        "hold_output_tokens": 100}]})  # fmt: skip


def pipeline(upstream: FakeUpstream, guard: MemoryGuard, sink: MemorySink) -> CallPipeline:
    book: PriceBook = PRICES
    return CallPipeline(settings(), guard=guard, charges=sink, upstream=upstream,
                        prices=lambda: book, metrics=ProxyMetrics(),
                        clock=lambda: NOW_MS)  # fmt: skip


def ctx(event_id: str = "e-1", user: str = "alice") -> BillingContext:
    return BillingContext(user_id=user, scene="chat", event_id=event_id)


def request(stream: bool = False, **extra: Any) -> bytes:
    return orjson.dumps({"model": "chat", "messages": [{"role": "user", "content": "hi"}],
                         "stream": stream, **extra})  # fmt: skip


def whole(usage: dict[str, int] | None) -> Answer:
    answer: dict[str, Any] = {"model": "up-model-2026", "choices": [
        {"message": {"role": "assistant", "content": "hello there"}}]}  # fmt: skip
    if usage is not None:
        answer["usage"] = usage
    return Answer([orjson.dumps(answer)])


def sse_events(*datas: object) -> list[bytes]:
    return [b"data: " + (d if isinstance(d, bytes) else orjson.dumps(d)) + b"\n\n"
            for d in datas]  # fmt: skip


CHUNK = {"model": "up-model-2026", "choices": [{"delta": {"content": "hel"}}]}
USAGE = {"choices": [], "usage": {"prompt_tokens": 10, "completion_tokens": 4}}


class Client:
    """The ASGI side of one call: what the client receives."""

    def __init__(self, leave_after: int | None = None) -> None:
        self.messages: list[dict[str, Any]] = []
        self.leave_after = leave_after
        self.gone = asyncio.Event()

    async def send(self, message: dict[str, Any]) -> None:
        self.messages.append(message)
        bodies = [m for m in self.messages if m["type"] == "http.response.body"]
        if self.leave_after is not None and len(bodies) >= self.leave_after:
            self.gone.set()

    async def receive(self) -> dict[str, Any]:
        await self.gone.wait()
        return {"type": "http.disconnect"}

    @property
    def status(self) -> int:
        return int(self.messages[0]["status"])

    @property
    def body(self) -> bytes:
        return b"".join(m.get("body", b"") for m in self.messages[1:])


def run(pipe: CallPipeline, raw: bytes, client: Client, context: BillingContext) -> None:
    async def go() -> None:
        await pipe.run("chat", "svc", context, raw, client.receive, client.send)
        await pipe.drain()

    asyncio.run(go())


def test_a_whole_answer_is_charged_at_its_price_before_it_is_sent() -> None:
    guard, sink = MemoryGuard({"alice": 10**9}), MemorySink()
    upstream = FakeUpstream(whole({"prompt_tokens": 10, "completion_tokens": 4}))
    client = Client()
    run(pipeline(upstream, guard, sink), request(), client, ctx())
    assert client.status == 200 and orjson.loads(client.body)["choices"]
    charge, _ = sink.charges["llm:svc:e-1"]
    # input 1 µcr/token, output 2 µcr/token (credits per million tokens = µcr per token)
    assert (charge.input_tokens, charge.output_tokens, charge.amount_micro) == (10, 4, 18)
    assert (charge.price_rule_id, charge.price_rule_version) == ("std", 3)
    assert charge.upstream_model == "up-model-2026" and not charge.usage_estimated
    assert charge.occurred_at_ms == NOW_MS and charge.user_id == "alice"
    assert upstream.requests[0]["model"] == "up-model"  # the alias's upstream model
    assert guard.settled == [("llm:svc:e-1", 18, True)]
    assert guard.holds == {("alice", "llm:svc:e-1"): 18}  # until the projector folds it
    headers = dict(client.messages[0]["headers"])
    assert headers[b"x-billing-event-id"] == b"e-1" and headers[b"x-request-id"] == b"up-1"


def test_without_usage_the_answer_is_charged_as_estimated() -> None:
    sink = MemorySink()
    run(pipeline(FakeUpstream(whole(None)), MemoryGuard({"alice": 10**9}), sink), request(),
        Client(), ctx())  # fmt: skip
    charge, _ = sink.charges["llm:svc:e-1"]
    assert charge.usage_estimated and charge.input_tokens > 0 and charge.output_tokens > 0
    assert charge.amount_micro > 0


def test_a_refused_hold_never_reaches_upstream() -> None:
    upstream = FakeUpstream(whole({"prompt_tokens": 1, "completion_tokens": 1}))
    guard, sink = MemoryGuard({"alice": 0}), MemorySink()
    with pytest.raises(ProxyError) as caught:
        run(pipeline(upstream, guard, sink), request(), Client(), ctx())
    assert caught.value.status == 402
    assert upstream.requests == [] and sink.charges == {} and guard.holds == {}


def test_an_upstream_refusal_releases_the_hold_and_charges_nothing() -> None:
    upstream = FakeUpstream(ProxyError(429, "rate_limit_exceeded", "slow down",
                                       headers={"retry-after": "2"}))  # fmt: skip
    guard, sink = MemoryGuard({"alice": 10**9}), MemorySink()
    with pytest.raises(ProxyError) as caught:
        run(pipeline(upstream, guard, sink), request(), Client(), ctx())
    assert (caught.value.status, caught.value.headers) == (429, {"retry-after": "2"})
    assert guard.holds == {} and sink.charges == {}


def test_a_broken_whole_answer_is_502_with_the_hold_released() -> None:
    guard, sink = MemoryGuard({"alice": 10**9}), MemorySink()
    answer = Answer([b'{"choices": ['], broken=True)
    with pytest.raises(ProxyError) as caught:
        run(pipeline(FakeUpstream(answer), guard, sink), request(), Client(), ctx())
    assert caught.value.code == "upstream_error" and answer.closed
    assert guard.holds == {} and sink.charges == {}


def test_a_retry_is_charged_once_and_another_call_under_the_id_is_refused() -> None:
    guard, sink = MemoryGuard({"alice": 10**9}), MemorySink()
    usage = {"prompt_tokens": 10, "completion_tokens": 4}
    pipe = pipeline(FakeUpstream(whole(usage)), guard, sink)
    run(pipe, request(), Client(), ctx())
    retry = Client()
    run(pipe, request(), retry, ctx())
    assert retry.status == 200 and len(sink.charges) == 1
    assert guard.settled[-1] == ("llm:svc:e-1", 18, False)  # a duplicate adds nothing
    with pytest.raises(ProxyError) as caught:  # same id, another body: not a retry
        run(pipe, request(temperature=0.5), Client(), ctx())
    assert caught.value.code == "event_id_reused" and len(sink.charges) == 1


def test_a_charge_that_cannot_be_recorded_is_500_not_a_free_answer() -> None:
    guard, sink = MemoryGuard({"alice": 10**9}), MemorySink()
    sink.fail = OSError("disk full")
    client = Client()
    with pytest.raises(ProxyError) as caught:
        run(pipeline(FakeUpstream(whole({"prompt_tokens": 1, "completion_tokens": 1})), guard,
                     sink), request(), client, ctx())  # fmt: skip
    assert caught.value.code == "charge_not_recorded"
    assert client.messages == [] and guard.holds == {}  # nothing of the answer was sent


def test_a_stream_passes_events_on_and_drops_the_usage_chunk_it_asked_for() -> None:
    guard, sink = MemoryGuard({"alice": 10**9}), MemorySink()
    upstream = FakeUpstream(Answer(sse_events(CHUNK, CHUNK, USAGE, b"[DONE]")))
    client = Client()
    run(pipeline(upstream, guard, sink), request(stream=True), client, ctx())
    assert upstream.requests[0]["stream_options"] == {"include_usage": True}
    assert client.body == b"".join(sse_events(CHUNK, CHUNK)) + b"data: [DONE]\n\n"
    charge, _ = sink.charges["llm:svc:e-1"]
    assert (charge.input_tokens, charge.output_tokens, charge.usage_estimated) == (10, 4, False)
    wanted = Client()
    run(pipeline(FakeUpstream(Answer(sse_events(CHUNK, USAGE, b"[DONE]"))), guard, sink),
        request(stream=True, stream_options={"include_usage": True}), wanted,
        ctx("e-2"))  # fmt: skip
    assert orjson.dumps(USAGE) in wanted.body  # the client asked for it: it gets it


def test_a_stream_that_breaks_off_ends_with_an_error_event_and_is_charged() -> None:
    guard, sink = MemoryGuard({"alice": 10**9}), MemorySink()
    client = Client()
    run(pipeline(FakeUpstream(Answer(sse_events(CHUNK), broken=True)), guard, sink),
        request(stream=True), client, ctx())  # fmt: skip
    last = client.body.split(b"\n\n")[-2]
    assert b"upstream_incomplete" in last and b"[DONE]" not in client.body
    charge, _ = sink.charges["llm:svc:e-1"]
    assert charge.usage_estimated and charge.amount_micro > 0


def test_a_client_that_leaves_mid_stream_is_charged_for_what_it_got() -> None:
    guard, sink = MemoryGuard({"alice": 10**9}), MemorySink()

    class Slow(Answer):
        async def chunks(self) -> AsyncIterator[bytes]:
            yield sse_events(CHUNK)[0]
            await asyncio.sleep(30)  # the client leaves meanwhile
            yield sse_events(USAGE)[0]

    client = Client(leave_after=1)
    run(pipeline(FakeUpstream(Slow([])), guard, sink), request(stream=True), client, ctx())
    charge, _ = sink.charges["llm:svc:e-1"]
    assert charge.usage_estimated and charge.output_tokens > 0
    assert client.messages[-1] == {"type": "http.response.body", "body": b"",
                                   "more_body": False}  # fmt: skip
