"""What travels on the wire, pure: request bodies and their checks, what a call's
fingerprint is, what upstream's answers say (usage, model, text), how a stream's events
are passed on, and how an error reads (as a JSON answer, or as a stream's last event).

No I/O here: :mod:`llm_proxy.call` runs a call with these, :mod:`llm_proxy.app` serves it.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from contracts.fields import MODEL
from kernel.errors import ProxyError
from kernel.settings import ModelAlias
from llm_proxy import sse
from llm_proxy import usage as usage_mod
from llm_proxy.billing import BillingContext
from pricing.rules import TokenUsage

MAX_BODY = 32 * 1024 * 1024
DONE_EVENT = b"data: [DONE]\n\n"
JSON_HEADERS = [(b"content-type", b"application/json")]
# Answers a retry cannot change: the openai SDK is told not to retry them.
NOT_RETRIED = frozenset({400, 401, 402, 403, 404, 409, 413})
UPSTREAM_PATHS = {"chat": "/chat/completions", "embeddings": "/embeddings"}

Headers = list[tuple[bytes, bytes]]


def parse_body(raw: bytes) -> dict[str, Any]:
    """The request body as a JSON object, or a 400 saying why not."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ProxyError(400, "invalid_json", f"the request body is not valid JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise ProxyError(400, "invalid_request", "the request body must be a JSON object")
    return body


def check_request(route: str, body: dict[str, Any],
                  aliases: Mapping[str, ModelAlias]) -> ModelAlias:  # fmt: skip
    """The model alias the body asks for, once the body has what ``route`` needs."""
    name = body.get("model")
    if not isinstance(name, str) or not name:
        raise ProxyError(400, "invalid_request", "field 'model' is required", param="model")
    alias = aliases.get(name)
    if alias is None:
        known = ", ".join(sorted(aliases))
        raise ProxyError(404, "model_not_found", f"the model {name!r} does not exist "
                         f"(known: {known})", param="model")  # fmt: skip
    if route == "chat" and not isinstance(body.get("messages"), list):
        raise ProxyError(400, "invalid_request", "field 'messages' must be a list",
                         param="messages")  # fmt: skip
    if route == "embeddings" and not isinstance(body.get("input"), (str, list)):
        raise ProxyError(400, "invalid_request", "field 'input' must be a string or a list",
                         param="input")  # fmt: skip
    return alias


def is_stream(route: str, body: dict[str, Any]) -> bool:
    return route == "chat" and body.get("stream") is True


def wants_usage(body: dict[str, Any]) -> bool:
    """The client asked for the stream's usage chunk itself."""
    options = body.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


def upstream_body(body: dict[str, Any], alias: ModelAlias, stream: bool) -> bytes:
    """The body upstream gets: its own model name, and a stream always asks for usage."""
    out = dict(body)
    out["model"] = alias.upstream_model
    if stream:
        options = out.get("stream_options")
        out["stream_options"] = {**(options if isinstance(options, dict) else {}),
                                 "include_usage": True}  # fmt: skip
    return orjson.dumps(out)


def call_fingerprint(route: str, ctx: BillingContext, model_alias: str, raw_body: bytes) -> str:
    """What makes two calls under one event id the same call (a retry): who pays, for
    which model and scene, and the exact request body."""
    digest = hashlib.blake2b(raw_body, digest_size=16)
    for part in (route, ctx.user_id, ctx.scene, model_alias):
        digest.update(b"\x00" + part.encode())
    return digest.hexdigest()


# -- errors ----------------------------------------------------------------------------------


def error_response(exc: ProxyError) -> tuple[int, bytes, Headers]:
    headers = [*JSON_HEADERS, *((k.encode(), v.encode()) for k, v in exc.headers.items())]
    if exc.status in NOT_RETRIED:
        headers.append((b"x-should-retry", b"false"))  # the openai SDK would retry a 409
    return exc.status, orjson.dumps(exc.body()), headers


def error_event(exc: ProxyError) -> bytes:
    """An error as the last event of a stream: the openai SDK raises APIError on it."""
    return sse.Event(orjson.dumps(exc.body()).decode()).encode()


# -- streams ---------------------------------------------------------------------------------


@dataclass
class StreamState:
    datas: list[str] = field(default_factory=list)  # the data of each event passed on
    usage: TokenUsage | None = None
    done: bool = False
    client_gone: bool = False


def forward(item: sse.Item, state: StreamState, wants_usage: bool) -> bool:
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


def _event_data(datas: list[str]) -> list[dict[str, Any]]:
    out = []
    for data in datas:
        with contextlib.suppress(orjson.JSONDecodeError):
            parsed = orjson.loads(data)
            if isinstance(parsed, dict):
                out.append(parsed)
    return out


def streamed_text(datas: list[str]) -> str:
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


def streamed_model(datas: list[str], alias: ModelAlias) -> str:
    for data in _event_data(datas[:1]):
        if MODEL.ok(data.get("model")):
            return str(data["model"])
    return alias.upstream_model


# -- whole answers ---------------------------------------------------------------------------


def parse_answer(data: bytes) -> dict[str, Any]:
    """Upstream's JSON answer, or {} when it is not a JSON object (charged as estimated)."""
    try:
        answer = orjson.loads(data)
    except orjson.JSONDecodeError:
        return {}
    return answer if isinstance(answer, dict) else {}


def answer_text(answer: dict[str, Any]) -> str:
    parts: list[str] = []
    for choice in answer.get("choices") or []:
        message = choice.get("message") if isinstance(choice, dict) else None
        if isinstance(message, dict) and isinstance(message.get("content"), str):
            parts.append(message["content"])
    return "".join(parts)


def answer_model(answer: dict[str, Any], alias: ModelAlias) -> str:
    """The model upstream says it used, when it fits the field rule; else the configured one
    (a charge whose model the fold refused would be a free call)."""
    if MODEL.ok(answer.get("model")):
        return str(answer["model"])
    return alias.upstream_model
