"""Upstream protocol variety: SSE framings, broken streams, 429, unexpected errors.

A real proxy process in front of the fake upstream, driven by the official ``openai`` SDK.
The proxy here may retry upstream (``upstream_max_retries: 2``), to show that it does not
when upstream answered: the client's SDK retries, and the two must not multiply.
"""

from __future__ import annotations

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
]  # 7 prompt tokens at the fake's count
ONE_CALL = 10 * 7 + 20 * 5


@pytest.fixture
def world(stack_settings: Settings, scratch: ScratchTopics, unique: str) -> Iterator[ProxyWorld]:
    codec = load_codec(project_path(stack_settings.schemas.avro_dir))
    world = ProxyWorld(stack_settings, scratch, unique, codec,
                       proxy_settings={"upstream_max_retries": 2})  # fmt: skip
    try:
        world.start_proxy()
        yield world
    finally:
        world.cleanup()


def user(world: ProxyWorld) -> str:
    who = f"user-{uuid.uuid4().hex[:10]}"
    world.set_balance(who, 1_000_000)
    return who


@pytest.mark.parametrize("framing", [
    {"line_end": "\r\n"}, {"line_end": "\r"}, {"sse_extras": True},
    {"multiline_data": True}, {"unterminated_last": True},
    {"line_end": "\r\n", "sse_extras": True, "multiline_data": True, "unterminated_last": True},
])  # fmt: skip
def test_every_sse_framing_is_passed_on_and_charged_its_usage(
    world: ProxyWorld, framing: dict[str, object]
) -> None:
    world.behave(**framing)
    client = world.client(user(world))
    chunks = list(
        client.chat.completions.create(
            model="chat", messages=PROMPT, stream=True, stream_options={"include_usage": True}
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "w0 w1 w2 w3 w4"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 5
    [charge] = world.outbox_charges()
    assert (charge.input_tokens, charge.output_tokens, charge.usage_estimated) == (7, 5, False)
    assert charge.amount_micro == ONE_CALL


def test_a_stream_upstream_broke_off_raises_in_the_sdk_and_is_charged_as_estimated(
    world: ProxyWorld,
) -> None:
    world.behave(break_after=3, output_tokens=50)
    who = user(world)
    received = []
    with pytest.raises(openai.APIError) as caught:
        for chunk in world.client(who).chat.completions.create(model="chat", messages=PROMPT,
                                                               stream=True):  # fmt: skip
            if chunk.choices:
                received.append(chunk.choices[0].delta.content or "")
    assert isinstance(caught.value.body, dict)
    assert caught.value.body.get("code") == "upstream_incomplete"
    assert "".join(received) == "w0 w1 w2"
    [charge] = world.outbox_charges()
    assert charge.usage_estimated
    assert charge.output_tokens > 0
    assert charge.amount_micro == 10 * charge.input_tokens + 20 * charge.output_tokens
    assert 'kind="incomplete_stream"' in world.metrics()


def test_upstream_429_reaches_the_client_as_429_with_retry_after_once(
    world: ProxyWorld,
) -> None:
    world.behave(rate_limited=True)
    who = user(world)
    before = world.upstream_calls()
    with pytest.raises(openai.RateLimitError) as caught:
        world.client(who).chat.completions.create(model="chat", messages=PROMPT)
    response = caught.value.response
    assert response.status_code == 429
    assert response.headers["retry-after"] == "7"
    assert response.headers["x-request-id"].startswith("req-fake-")
    assert isinstance(caught.value.body, dict)
    assert caught.value.body.get("code") == "rate_limit_exceeded"
    # The proxy did not retry on its own (the client's SDK does, here max_retries=0).
    assert world.upstream_calls() == before + 1
    assert world.outbox_charges() == []
    assert world.holds(who).get("#total", "0") == "0"


def test_upstream_request_id_is_passed_on(world: ProxyWorld) -> None:
    raw = world.client(user(world)).chat.completions.with_raw_response.create(
        model="chat", messages=PROMPT)  # fmt: skip
    assert raw.headers["x-request-id"].startswith("req-fake-")
    assert raw.headers["x-billing-event-id"]


def test_an_unexpected_error_is_an_openai_shaped_500_and_releases_the_hold(
    world: ProxyWorld,
) -> None:
    """Usage no 64-bit amount can price: the charge cannot even be encoded."""
    world.behave(usage_override={"prompt_tokens": 10**19, "completion_tokens": 1})
    who = user(world)
    with pytest.raises(openai.InternalServerError) as caught:
        world.client(who).chat.completions.create(model="chat", messages=PROMPT)
    assert caught.value.status_code == 500
    assert isinstance(caught.value.body, dict)
    assert caught.value.body.get("code") == "internal_error"
    assert caught.value.body.get("type") == "server_error"
    assert world.holds(who).get("#total", "0") == "0"
    # The proxy goes on serving.
    world.behave(usage_override=None)
    world.client(who).chat.completions.create(model="chat", messages=PROMPT)
