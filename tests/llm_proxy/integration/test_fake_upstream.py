"""The fake upstream speaks the OpenAI protocol well enough for the official SDK."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import openai
import pytest

from llm_proxy.fake_upstream import set_behaviour
from stack.processes import wait_http
from testbed.proxy import free_port

KEY = "sk-fake-upstream-test"


@pytest.fixture(scope="module")
def upstream() -> Iterator[str]:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "creditledger.cli", "fake-upstream", "--port", str(port),
         "--api-key", KEY, "--output-tokens", "5"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    assert wait_http(f"{base}/_fake/behaviour", process, 30), (
        process.stdout.read() if process.stdout and process.poll() is not None else "not up"
    )
    yield base
    process.terminate()
    process.wait(10)


def behave(base: str, **fields: object) -> None:
    set_behaviour(base, **fields)


@pytest.fixture
def client(upstream: str) -> Iterator[openai.OpenAI]:
    behave(upstream, output_tokens=5, usage_chunk=True, usage_in_response=True,
           cached_tokens=0, reasoning_tokens=0)  # fmt: skip
    with openai.OpenAI(base_url=f"{upstream}/v1", api_key=KEY, max_retries=0) as c:
        yield c


def test_non_streamed_answer_carries_usage(client: openai.OpenAI, upstream: str) -> None:
    behave(upstream, cached_tokens=2, reasoning_tokens=3)
    answer = client.chat.completions.create(
        model="fake-small", messages=[{"role": "user", "content": "one two three"}]
    )
    assert answer.choices[0].message.content == "w0 w1 w2 w3 w4"
    assert answer.usage is not None
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (6, 8)
    assert answer.usage.prompt_tokens_details is not None
    assert answer.usage.prompt_tokens_details.cached_tokens == 2
    assert answer.usage.completion_tokens_details is not None
    assert answer.usage.completion_tokens_details.reasoning_tokens == 3


def test_stream_ends_with_a_usage_chunk_when_asked(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="fake-small", messages=[{"role": "user", "content": "hi"}], stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "w0 w1 w2 w3 w4"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 5 and chunks[-1].usage.prompt_tokens == 4


def test_stream_without_usage_chunk(client: openai.OpenAI, upstream: str) -> None:
    behave(upstream, usage_chunk=False)
    stream = client.chat.completions.create(
        model="fake-small", messages=[{"role": "user", "content": "hi"}], stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    assert all(chunk.usage is None for chunk in stream)


def test_embeddings_models_and_errors(client: openai.OpenAI, upstream: str) -> None:
    vectors = client.embeddings.create(model="fake-embed", input=["a b", "c"])
    assert len(vectors.data) == 2 and vectors.usage.prompt_tokens == 3
    assert "fake-small" in [m.id for m in client.models.list()]
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model="fake-small", messages=[])
    assert bad.value.status_code == 400
    assert bad.value.body is not None and "messages" in str(bad.value.body)
    stranger = openai.OpenAI(base_url=f"{upstream}/v1", api_key="wrong", max_retries=0)
    with stranger, pytest.raises(openai.AuthenticationError):
        stranger.models.list()
