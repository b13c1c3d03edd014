"""A stand-in for the upstream LLM: a real HTTP server that speaks the OpenAI protocol.

Used by the tests, the benchmarks and the demo (the only thing this project
ever fakes is the model itself). It answers ``POST /v1/chat/completions``
(streamed as server-sent events or not, with or without the final usage
chunk), ``POST /v1/embeddings`` and ``GET /v1/models`` in OpenAI's shapes,
with OpenAI-shaped error bodies.

Its behaviour (latency before the first byte, delay between chunks, output,
cached and reasoning token counts, whether a usage chunk is sent) starts from
the command line and can be changed while it runs with ``POST
/_fake/behaviour`` (a JSON object of the fields to change), so one server
can serve every case of a test run.

Token counts are deterministic and simple: a prompt token is a
whitespace-separated word of a message, plus 3 per message; the reply is
``output_tokens`` words, one per streamed chunk.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

MODELS = ("fake-small", "fake-large", "fake-embed")
EMBEDDING_SIZE = 8


@dataclass
class Behaviour:
    latency_ms: int = 0
    chunk_delay_ms: int = 0
    output_tokens: int = 16
    cached_tokens: int = 0
    reasoning_tokens: int = 0
    usage_chunk: bool = True  # honour stream_options.include_usage
    usage_in_response: bool = True  # non-streamed answers carry usage
    reply: str | None = None  # answer with this text (one token per word) instead of w0 w1 ...
    # Stream framing, to exercise the proxy's SSE parser: the line end ("\n", "\r\n" or
    # "\r"), keep-alive comments and event fields between events, each JSON split over two
    # data lines, and the last event ([DONE]) sent without its terminating blank line.
    line_end: str = "\n"
    sse_extras: bool = False
    multiline_data: bool = False
    unterminated_last: bool = False
    break_after: int | None = None  # stop the stream after this many words, no [DONE]
    rate_limited: bool = False  # answer 429 with Retry-After
    usage_override: dict[str, Any] | None = None  # report this usage object instead


def error(status: int, message: str, kind: str = "invalid_request_error",
          param: str | None = None, code: str | None = None) -> JSONResponse:  # fmt: skip
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status)


def prompt_tokens(messages: list[Any]) -> int:
    count = 0
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list):  # content parts
            content = " ".join(p.get("text", "") for p in content if isinstance(p, dict))
        count += 3 + len(str(content or "").split())
    return count


def reply_words(behaviour: Behaviour) -> list[str]:
    if behaviour.reply is not None:
        return behaviour.reply.split(" ")
    return [f"w{n}" for n in range(behaviour.output_tokens)]


def usage_body(prompt: int, behaviour: Behaviour) -> dict[str, Any]:
    if behaviour.usage_override is not None:
        return behaviour.usage_override
    completion = len(reply_words(behaviour)) + behaviour.reasoning_tokens
    return {
        "prompt_tokens": prompt, "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": min(behaviour.cached_tokens, prompt)},
        "completion_tokens_details": {"reasoning_tokens": behaviour.reasoning_tokens},
    }  # fmt: skip


class FakeUpstream:
    def __init__(self, behaviour: Behaviour | None = None, api_key: str | None = None) -> None:
        self.behaviour = behaviour or Behaviour()
        self.api_key = api_key
        self.calls = 0
        self.app = Starlette(routes=[
            Route("/v1/chat/completions", self.chat, methods=["POST"]),
            Route("/v1/embeddings", self.embeddings, methods=["POST"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/_fake/behaviour", self.set_behaviour, methods=["GET", "POST"]),
        ])  # fmt: skip

    def _refused(self, request: Request) -> JSONResponse | None:
        if self.api_key is None:
            return None
        if request.headers.get("authorization") != f"Bearer {self.api_key}":
            return error(401, "Incorrect API key provided.", "invalid_request_error",
                         code="invalid_api_key")  # fmt: skip
        return None

    async def _model_request(self, request: Request) -> dict[str, Any] | JSONResponse:
        """The checks every model call starts with: the key, a JSON object, a model."""
        refused = self._refused(request)
        if refused is not None:
            return refused
        body = await self._json(request)
        if isinstance(body, dict):
            model = body.get("model")
            if not isinstance(model, str) or not model:
                return error(400, "you must provide a model parameter", param="model")
        return body

    async def _json(self, request: Request) -> dict[str, Any] | JSONResponse:
        try:
            body = json.loads(await request.body())
        except ValueError:
            return error(400, "We could not parse the JSON body of your request.")
        if not isinstance(body, dict):
            return error(400, "The request body must be a JSON object.")
        return body

    async def chat(self, request: Request) -> Response:
        body = await self._model_request(request)
        if isinstance(body, JSONResponse):
            return body
        model, messages = body["model"], body.get("messages")
        if not isinstance(messages, list) or not messages:
            return error(400, "'messages' must be a non-empty array", param="messages")
        self.calls += 1
        behaviour = dataclasses.replace(self.behaviour)
        if behaviour.rate_limited:
            response = error(429, "Rate limit reached, retry later", kind="requests",
                             code="rate_limit_exceeded")  # fmt: skip
            response.headers["retry-after"] = "7"
            response.headers["x-request-id"] = f"req-fake-{self.calls}"
            return response
        prompt = prompt_tokens(messages)
        if behaviour.latency_ms:
            await asyncio.sleep(behaviour.latency_ms / 1000)
        ident, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        words = reply_words(behaviour)
        if not body.get("stream"):
            answer: dict[str, Any] = {
                "id": ident, "object": "chat.completion", "created": created, "model": model,
                "choices": [{"index": 0, "finish_reason": "stop", "logprobs": None,
                             "message": {"role": "assistant", "content": " ".join(words)}}],
            }  # fmt: skip
            if behaviour.usage_in_response:
                answer["usage"] = usage_body(prompt, behaviour)
            return JSONResponse(answer, headers={"x-request-id": f"req-fake-{self.calls}"})
        options = body.get("stream_options") or {}
        with_usage = bool(options.get("include_usage")) and behaviour.usage_chunk
        return StreamingResponse(
            self._stream(ident, created, model, words, prompt, behaviour, with_usage),
            media_type="text/event-stream",
        )

    async def _stream(self, ident: str, created: int, model: str, words: list[str],
                      prompt: int, behaviour: Behaviour,
                      with_usage: bool) -> AsyncIterator[bytes]:  # fmt: skip
        end = behaviour.line_end

        def event(data: str, last: bool = False) -> bytes:
            lines = [f"data: {data}"]
            if behaviour.multiline_data and data.startswith("{"):
                lines = [f"data: {data[:1]}", f"data: {data[1:]}"]  # JSON spans the LF
            if behaviour.sse_extras:
                lines = [": keep-alive", "event: message", *lines]
            text = end.join(lines) + ("" if last and behaviour.unterminated_last else end * 2)
            return text.encode()

        def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
            data = {"id": ident, "object": "chat.completion.chunk", "created": created,
                    "model": model, "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                                 "finish_reason": finish}]}  # fmt: skip
            return event(json.dumps(data))

        yield chunk({"role": "assistant", "content": ""})
        for n, word in enumerate(words):
            if behaviour.break_after is not None and n >= behaviour.break_after:
                return  # upstream broke off: no finish_reason, no usage, no [DONE]
            if behaviour.chunk_delay_ms:
                await asyncio.sleep(behaviour.chunk_delay_ms / 1000)
            yield chunk({"content": word if n == 0 else f" {word}"})
        yield chunk({}, "stop")
        if with_usage:
            usage = usage_body(prompt, behaviour)
            data = {"id": ident, "object": "chat.completion.chunk", "created": created,
                    "model": model, "choices": [], "usage": usage}  # fmt: skip
            yield event(json.dumps(data))
        yield event("[DONE]", last=True)

    async def embeddings(self, request: Request) -> Response:
        body = await self._model_request(request)
        if isinstance(body, JSONResponse):
            return body
        model, given = body["model"], body.get("input")
        texts = [given] if isinstance(given, str) else given
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
            return error(400, "'input' must be a string or an array of strings", param="input")
        self.calls += 1
        if self.behaviour.latency_ms:
            await asyncio.sleep(self.behaviour.latency_ms / 1000)
        tokens = sum(len(t.split()) for t in texts)
        data = [{"object": "embedding", "index": i,
                 "embedding": [((len(t) + k) % 7) / 7 for k in range(EMBEDDING_SIZE)]}
                for i, t in enumerate(texts)]  # fmt: skip
        usage = {"prompt_tokens": tokens, "total_tokens": tokens}
        return JSONResponse({"object": "list", "data": data, "model": model, "usage": usage})

    async def models(self, request: Request) -> Response:
        refused = self._refused(request)
        if refused is not None:
            return refused
        return JSONResponse({"object": "list", "data": [
            {"id": m, "object": "model", "created": 0, "owned_by": "fake-upstream"}
            for m in MODELS]})  # fmt: skip

    async def set_behaviour(self, request: Request) -> Response:
        if request.method == "POST":
            body = await self._json(request)
            if isinstance(body, JSONResponse):
                return body
            known = {f.name: f.type for f in dataclasses.fields(Behaviour)}
            unknown = sorted(set(body) - set(known))
            if unknown:
                return error(400, f"unknown behaviour field(s): {unknown}")
            self.behaviour = dataclasses.replace(self.behaviour, **body)
        return JSONResponse({**dataclasses.asdict(self.behaviour), "calls": self.calls})


def set_behaviour(base_url: str, **fields: object) -> dict[str, Any]:
    """Change a running fake upstream's behaviour (``base_url`` without ``/v1``); its new state."""
    import urllib.request

    request = urllib.request.Request(
        f"{base_url}/_fake/behaviour", data=json.dumps(fields).encode(), method="POST",
        headers={"Content-Type": "application/json"},
    )  # fmt: skip
    with urllib.request.urlopen(request, timeout=5) as response:
        state: dict[str, Any] = json.loads(response.read())
        return state


def serve(host: str, port: int, behaviour: Behaviour, api_key: str | None) -> None:
    import uvicorn

    fake = FakeUpstream(behaviour, api_key)
    uvicorn.run(fake.app, host=host, port=port, loop="uvloop", http="httptools",
                log_level="warning", access_log=False)  # fmt: skip
