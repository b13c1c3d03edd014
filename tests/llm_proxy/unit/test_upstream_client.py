"""The cached request template gives exactly the request the SDK itself builds."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx2
import openai
import pytest
from openai._models import FinalRequestOptions

from llm_proxy.upstream import UpstreamClient


def clients() -> tuple[openai.AsyncOpenAI, UpstreamClient]:
    kwargs = {"base_url": "http://127.0.0.1:9/v1", "api_key": "sk-test", "max_retries": 2,
              "timeout": httpx2.Timeout(30.0, connect=2.0)}  # fmt: skip
    return openai.AsyncOpenAI(**kwargs), UpstreamClient(**kwargs)  # type: ignore[arg-type]


def options(body: bytes, url: str = "/chat/completions", **extra: Any) -> FinalRequestOptions:
    return FinalRequestOptions.construct(
        method="post", url=url, content=body,
        headers={"Content-Type": "application/json"}, **extra,
    )  # fmt: skip


def same(a: httpx2.Request, b: httpx2.Request) -> None:
    assert a.method == b.method
    assert str(a.url) == str(b.url)
    assert a.headers.raw == b.headers.raw
    assert a.read() == b.read()
    assert a.extensions == b.extensions


@pytest.mark.parametrize("retries_taken", [0, 1, 2])
def test_template_matches_the_sdk_for_every_body_and_retry(retries_taken: int) -> None:
    sdk, ours = clients()
    for n, body in enumerate([b'{"model":"m"}', b'{"model":"m","messages":[]}' * 50, b"{}"]):
        url = "/embeddings" if n == 2 else "/chat/completions"
        same(sdk._build_request(options(body, url), retries_taken=retries_taken),
             ours._build_request(options(body, url), retries_taken=retries_taken))  # fmt: skip
    # Called again, the cached template must still give a fresh, identical request.
    again = ours._build_request(options(b'{"x":1}'), retries_taken=retries_taken)
    same(sdk._build_request(options(b'{"x":1}'), retries_taken=retries_taken), again)
    assert ours._templates, "the fast path was not taken"


def test_requests_a_template_cannot_hold_go_through_the_sdk() -> None:
    sdk, ours = clients()
    cases = [
        FinalRequestOptions.construct(
            method="post", url="/chat/completions", json_data={"model": "m"}
        ),
        options(b"{}", timeout=5.0),
        options(b"{}", params={"a": "b"}),
    ]
    for case in cases:
        same(sdk._build_request(case), ours._build_request(case))
    assert not ours._templates


def test_extensions_are_not_shared_between_requests() -> None:
    _, ours = clients()
    first = ours._build_request(options(b"{}"))
    first.extensions["timeout"] = {"read": 0.0}
    second = ours._build_request(options(b"{}"))
    assert second.extensions["timeout"]["read"] == 30.0


def test_user_agent_is_the_sdks() -> None:
    sdk, ours = clients()
    assert ours.user_agent == sdk.user_agent
    asyncio.run(ours.close())
    asyncio.run(sdk.close())
