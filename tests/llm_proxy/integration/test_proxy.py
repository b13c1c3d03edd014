"""The proxy through the official openai SDK: usage, prices, errors, idempotency, the guard."""

from __future__ import annotations

import concurrent.futures
import socket
import time
import uuid
from collections.abc import Iterator

import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from kernel.settings import Settings, project_path
from streams.codec import load_codec
from testbed.proxy import ProxyWorld
from testbed.topics import ScratchTopics

PROMPT: list[ChatCompletionMessageParam] = [
    {"role": "user", "content": "say something short please"}
]  # 4 words + 3 = 7 tokens
PROMPT_TOKENS = 7


def price(input_tokens: int, output_tokens: int) -> int:
    """The test rule: 10 per input token, 20 per output token, at least 1."""
    return max(1, 10 * input_tokens + 20 * output_tokens)


@pytest.fixture
def world(stack_settings: Settings, scratch: ScratchTopics, unique: str) -> Iterator[ProxyWorld]:
    codec = load_codec(project_path(stack_settings.schemas.avro_dir))
    world = ProxyWorld(stack_settings, scratch, unique, codec)
    try:
        world.start_proxy()
        yield world
    finally:
        world.cleanup()


def user() -> str:
    return f"user-{uuid.uuid4().hex[:10]}"


def test_non_streamed_call_is_charged_its_reported_usage(world: ProxyWorld) -> None:
    who = user()
    world.set_balance(who, 1_000_000)
    client = world.client(who, **{"X-Request-Id": "req-1", "X-Conversation-Id": "conv-1"})
    answer = client.chat.completions.create(model="chat", messages=PROMPT)
    assert answer.usage is not None and answer.usage.prompt_tokens == PROMPT_TOKENS
    assert answer.choices[0].message.content == "w0 w1 w2 w3 w4"
    [charge] = world.outbox_charges()
    assert (charge.user_id, charge.scene, charge.request_id, charge.conversation_id) == (
        who, "chat", "req-1", "conv-1")  # fmt: skip
    assert (charge.model_alias, charge.upstream_model) == ("chat", "fake-small")
    assert (charge.input_tokens, charge.output_tokens, charge.usage_estimated) == (7, 5, False)
    assert (charge.price_rule_id, charge.price_rule_version) == ("test-chat", 1)
    assert charge.amount_micro == price(7, 5)
    # The settled charge stays held until the ledger folds it.
    holds = world.holds(who)
    assert holds[charge.event_id].split("|")[0] == str(charge.amount_micro)
    assert holds["#total"] == str(charge.amount_micro)


def test_streamed_call_passes_through_and_is_charged(world: ProxyWorld) -> None:
    who = user()
    world.set_balance(who, 1_000_000)
    client = world.client(who)
    chunks = list(client.chat.completions.create(model="chat", messages=PROMPT,
                                                 stream=True))  # fmt: skip
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "w0 w1 w2 w3 w4"
    # The client did not ask for usage: the usage chunk the proxy asked for is not passed on.
    assert all(c.usage is None for c in chunks)
    [charge] = world.outbox_charges()
    assert (charge.input_tokens, charge.output_tokens, charge.usage_estimated) == (7, 5, False)
    assert charge.amount_micro == price(7, 5)

    with_usage = list(client.chat.completions.create(
        model="chat", messages=PROMPT, stream=True,
        stream_options={"include_usage": True}))  # fmt: skip
    assert with_usage[-1].usage is not None and with_usage[-1].usage.completion_tokens == 5


def test_stream_without_usage_chunk_is_estimated(world: ProxyWorld) -> None:
    who = user()
    world.set_balance(who, 1_000_000)
    world.behave(usage_chunk=False, output_tokens=8)
    chunks = list(world.client(who).chat.completions.create(
        model="chat", messages=PROMPT, stream=True))  # fmt: skip
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) == 8
    [charge] = world.outbox_charges()
    assert charge.usage_estimated
    # tiktoken: "w0 w1 ... w7" is 2 tokens per word here; the prompt 5 words + 3 + 3 + role.
    assert charge.output_tokens > 0 and charge.input_tokens > 0
    assert charge.amount_micro == price(charge.input_tokens, charge.output_tokens)
    assert 'llm_proxy_usage_estimated_total{reason="no_usage"} 1.0' in world.metrics()


def test_client_disconnect_mid_stream_is_charged_the_estimate(world: ProxyWorld) -> None:
    who = user()
    world.set_balance(who, 1_000_000)
    world.behave(output_tokens=400, chunk_delay_ms=20)
    stream = world.client(who).chat.completions.create(
        model="chat", messages=PROMPT, stream=True)  # fmt: skip
    received = 0
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            received += 1
        if received == 10:
            break
    stream.close()  # drops the connection mid-stream
    deadline = time.monotonic() + 15
    while not world.outbox_charges() and time.monotonic() < deadline:
        time.sleep(0.1)
    [charge] = world.outbox_charges()
    assert charge.usage_estimated
    # Charged for what was streamed before the client left, not for the whole answer.
    assert 10 <= charge.output_tokens < 200, charge
    assert 'llm_proxy_usage_estimated_total{reason="client_gone"} 1.0' in world.metrics()


def test_embeddings_are_charged(world: ProxyWorld) -> None:
    who = user()
    world.set_balance(who, 1_000_000)
    result = world.client(who, scene="search").embeddings.create(model="embed",
                                                                 input="one two three")  # fmt: skip
    assert len(result.data[0].embedding) > 0
    [charge] = world.outbox_charges()
    assert (charge.model_alias, charge.price_rule_id, charge.output_tokens) == (
        "embed", "test-embed", 0)  # fmt: skip
    assert charge.amount_micro == 2 * charge.input_tokens


def test_same_event_id_twice_is_one_charge(world: ProxyWorld) -> None:
    who = user()
    world.set_balance(who, 1_000_000)
    client = world.client(who, **{"X-Billing-Event-Id": "evt-retry-1"})
    for _ in range(3):
        client.chat.completions.create(model="chat", messages=PROMPT)
    [charge] = world.outbox_charges()
    assert charge.event_id == "llm:billing:evt-retry-1"  # in the calling service's namespace
    assert world.holds(who)["#total"] == str(charge.amount_micro)
    assert 'llm_proxy_charges_total{path="duplicate"} 2.0' in world.metrics()


def error_of(call: object) -> openai.APIStatusError:
    with pytest.raises(openai.APIStatusError) as caught:
        call()  # type: ignore[operator]
    return caught.value


def test_refusals_have_openai_shaped_bodies(world: ProxyWorld) -> None:
    who = user()
    world.set_balance(who, 1_000_000)

    def call(client: openai.OpenAI, model: str = "chat") -> object:
        return lambda: client.chat.completions.create(model=model, messages=PROMPT)

    cases = [
        (world.client(who, key="clp-not-a-key"), 401, "invalid_api_key", None),
        (world.client(who, scene="payroll"), 403, "scene_not_allowed", "X-Billing-Scene"),
        (world.client(who, **{"X-Billing-Skip-Charge": "true"}), 403,
         "skip_charge_not_allowed", "X-Billing-Skip-Charge"),
        (world.client(None), 400, "missing_billing_header", "X-Billing-User-Id"),
        (world.client(who, scene=None), 400, "missing_billing_header", "X-Billing-Scene"),
        (world.client(""), 400, "missing_billing_header", "X-Billing-User-Id"),
        (world.client("bad user"), 400, "invalid_billing_header", "X-Billing-User-Id"),
        (world.client(user()), 402, "insufficient_credits", None),  # no balance at all
    ]  # fmt: skip
    for client, status, code, param in cases:
        err = error_of(call(client))
        assert err.status_code == status, (code, err)
        assert isinstance(err.body, dict) and err.body.get("code") == code, err.body
        assert err.body.get("param") == param
        assert isinstance(err.body.get("message"), str) and err.body.get("type")
    err = error_of(call(world.client(who), model="no-such-model"))
    assert err.status_code == 404 and isinstance(err.body, dict)
    assert err.body["code"] == "model_not_found"
    assert world.outbox_charges() == []
    assert world.holds(who).get("#total", "0") == "0"
    metrics = world.metrics()
    assert 'llm_proxy_guard_refusals_total{reason="insufficient_credits"} 1.0' in metrics
    assert 'llm_proxy_requests_total{route="chat",status="401"} 1.0' in metrics


def test_skip_charge_service_is_not_charged(world: ProxyWorld) -> None:
    client = world.client(user(), key=world.ops_key, **{"X-Billing-Skip-Charge": "true"})
    client.chat.completions.create(model="chat", messages=PROMPT)
    assert world.outbox_charges() == []


def test_upstream_errors_release_the_hold(world: ProxyWorld) -> None:
    who = user()
    world.set_balance(who, 1_000_000)
    err = error_of(lambda: world.client(who).chat.completions.create(model="chat", messages=[]))
    assert err.status_code == 400  # upstream's own verdict, passed on
    assert isinstance(err.body, dict) and err.body["param"] == "messages"
    world.stop("upstream")
    err = error_of(lambda: world.client(who).chat.completions.create(
        model="chat", messages=PROMPT))  # fmt: skip
    assert err.status_code == 502 and isinstance(err.body, dict)
    assert err.body["code"] == "upstream_unreachable"
    assert world.outbox_charges() == []
    assert world.holds(who).get("#total", "0") == "0"


def test_guard_lets_at_most_one_call_overspend(world: ProxyWorld) -> None:
    """200 concurrent calls against a balance worth 10: at most 11 get through."""
    who = user()
    one_call = price(PROMPT_TOKENS, 5)
    world.set_balance(who, 10 * one_call)
    world.behave(latency_ms=300)  # every call is still in flight when the last one arrives
    client = world.client(who)

    def attempt(_: int) -> int:
        try:
            client.chat.completions.create(model="chat", messages=PROMPT, max_tokens=5)
            return 200
        except openai.APIStatusError as exc:
            return exc.status_code

    with concurrent.futures.ThreadPoolExecutor(200) as pool:
        statuses = list(pool.map(attempt, range(200)))
    succeeded = statuses.count(200)
    assert set(statuses) <= {200, 402}, statuses
    assert 1 <= succeeded <= 11, statuses
    charges = world.outbox_charges()
    assert len(charges) == succeeded
    spent = sum(c.amount_micro for c in charges)
    # The bound the guard promises: the balance plus at most one call's cost.
    assert spent <= 10 * one_call + one_call, (spent, statuses)
    # Holds err high (a cheap bound on the prompt), but not so high that most calls starve.
    assert succeeded >= 5, statuses
    # Settled charges stay held until folded: with what is left, no further call fits.
    world.behave(latency_ms=0)
    while spent < 10 * one_call:
        client.chat.completions.create(model="chat", messages=PROMPT, max_tokens=5)
        spent += one_call
    err = error_of(lambda: client.chat.completions.create(model="chat", messages=PROMPT))
    assert err.status_code == 402


def test_unknown_routes_and_bad_json(world: ProxyWorld) -> None:
    with socket.create_connection(("127.0.0.1", world.port)) as sock:
        body = b"{not json"
        head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                f"{world.key}\r\nX-Billing-User-Id: u1\r\nX-Billing-Scene: chat\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
                "Connection: close\r\n\r\n")  # fmt: skip
        sock.sendall(head.encode() + body)
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 400"), reply
    assert b'"code":"invalid_json"' in reply
    models = world.client(user()).models.list()
    assert sorted(m.id for m in models.data) == ["chat", "embed"]


def test_holds_assume_the_aliases_typical_answer_so_k_calls_of_credit_run_k_over_2_at_once(
    stack_settings: Settings,
    scratch: ScratchTopics,
    unique: str,
) -> None:
    """Credit for 10 typical calls (no max_tokens): at least 5 run concurrently, and together
    they still overspend by at most one call."""
    codec = load_codec(project_path(stack_settings.schemas.avro_dir))
    typical = ProxyWorld(stack_settings, scratch, unique, codec,
                         chat_alias={"hold_output_tokens": 5})  # fmt: skip
    try:
        typical.start_proxy()
        who = user()
        one_call = price(PROMPT_TOKENS, 5)
        typical.set_balance(who, 10 * one_call)
        typical.behave(latency_ms=500)
        client = typical.client(who)

        def attempt(_: int) -> int:
            try:
                client.chat.completions.create(model="chat", messages=PROMPT)
                return 200
            except openai.APIStatusError as exc:
                return exc.status_code

        with concurrent.futures.ThreadPoolExecutor(10) as pool:
            statuses = list(pool.map(attempt, range(10)))
        assert set(statuses) <= {200, 402}, statuses
        assert statuses.count(200) >= 5, statuses
        spent = sum(c.amount_micro for c in typical.outbox_charges())
        assert spent <= 11 * one_call
    finally:
        typical.cleanup()
