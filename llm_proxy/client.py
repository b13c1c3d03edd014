"""The Python client SDK of the proxy (the counterpart of the seed's Go ``client/llm``).

A service sets who pays once, around the work, and every call inside sends it::

    with billing_context(user_id="u-42", scene="chat"):
        text = llm.generate_text("gpt-demo", "Summarise this ...")

The context lives in a ``contextvars.ContextVar``, so it follows the code
through threads started with ``contextvars.copy_context`` and through asyncio
tasks (each task copies the context it was created in), like Go's
``context.WithValue``. Values are normalised as the proxy normalises them
(whitespace trimmed; empty = absent) and can be read back with
:func:`current_billing` (``None`` outside any context). A nested context keeps
the fields it does not set from the enclosing one.

Idempotency: an ``event_id`` set in the context bills exactly one call (use it
when the whole unit of work is one call that may be retried). Without one,
each helper call makes a fresh event id and sends it on every retry the
``openai`` SDK makes, so a retried call is still charged once.
"""

from __future__ import annotations

import contextvars
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from typing import Any, TypeVar

import openai
from openai.types.chat import ChatCompletionMessageParam
from pydantic import BaseModel, ValidationError

from kernel.errors import CreditLedgerError, ProxyError
from llm_proxy.billing import (
    CONVERSATION_HEADER,
    EVENT_HEADER,
    REQUEST_HEADER,
    SCENE_HEADER,
    USER_HEADER,
    BillingContext,
    check_id,
    normalise,
    to_headers,
)

Model = TypeVar("Model", bound=BaseModel)
Messages = str | Sequence[ChatCompletionMessageParam]

_current: contextvars.ContextVar[BillingContext | None] = contextvars.ContextVar(
    "creditledger_billing", default=None
)


class BillingContextError(CreditLedgerError):
    """A call needs a billing context (user and scene) and none is set, or it is invalid."""


class LLMOutputError(CreditLedgerError):
    """The model's answer is not what was asked for (e.g. not JSON of the given shape)."""


def _field(header: str, value: str | None) -> str | None:
    value = normalise(value)
    if value is None:
        return None
    try:
        return check_id(header, value)
    except ProxyError as exc:
        raise BillingContextError(exc.message) from exc


@contextmanager
def billing_context(*, user_id: str | None = None, scene: str | None = None,
                    event_id: str | None = None, request_id: str | None = None,
                    conversation_id: str | None = None,
                    skip_charge: bool | None = None) -> Iterator[BillingContext]:  # fmt: skip
    """Set who pays for the calls made inside the block (fields not given are inherited)."""
    outer = _current.get()
    user = _field(USER_HEADER, user_id) or (outer.user_id if outer else None)
    where = _field(SCENE_HEADER, scene) or (outer.scene if outer else None)
    if user is None or where is None:
        raise BillingContextError("a billing context needs a user_id and a scene")
    given_event = _field(EVENT_HEADER, event_id)
    ctx = BillingContext(
        user_id=user, scene=where,
        # An inherited event id would bill two units of work as one: it is never inherited.
        event_id=given_event or "", event_id_generated=given_event is None,
        request_id=_field(REQUEST_HEADER, request_id) or (outer.request_id if outer else None),
        conversation_id=_field(CONVERSATION_HEADER, conversation_id)
        or (outer.conversation_id if outer else None),
        skip_charge=skip_charge if skip_charge is not None else bool(outer and outer.skip_charge),
    )  # fmt: skip
    token = _current.set(ctx)
    try:
        yield ctx
    finally:
        _current.reset(token)


def current_billing() -> BillingContext | None:
    """The billing context in force here, or None."""
    return _current.get()


def billing_headers() -> dict[str, str]:
    """The headers for one call from the current context; each call gets its own event id
    unless the context fixed one."""
    ctx = _current.get()
    if ctx is None:
        raise BillingContextError("no billing context: wrap the call in "
                                  "`with billing_context(user_id=..., scene=...):`")  # fmt: skip
    if ctx.event_id_generated:
        ctx = replace(ctx, event_id=f"llm-{uuid.uuid4().hex}", event_id_generated=False)
    return to_headers(ctx)


def _messages(prompt: Messages) -> list[ChatCompletionMessageParam]:
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return list(prompt)


def _parse(schema: type[Model], text: str | None) -> Model:
    try:
        return schema.model_validate_json(text or "")
    except ValidationError as exc:
        raise LLMOutputError(f"the model's answer is not a valid {schema.__name__}: {exc}") from exc


class LLMClient:
    """Calls through the proxy with the official SDK; billing headers from the context."""

    def __init__(self, base_url: str, api_key: str, *, timeout: float = 120.0,
                 max_retries: int = 2) -> None:  # fmt: skip
        self.openai = openai.OpenAI(base_url=base_url, api_key=api_key, timeout=timeout,
                                    max_retries=max_retries)  # fmt: skip

    def generate_text(self, model: str, prompt: Messages, **params: Any) -> str:
        answer = self.openai.chat.completions.create(
            model=model, messages=_messages(prompt), extra_headers=billing_headers(), **params
        )
        return answer.choices[0].message.content or ""

    def generate_json(self, model: str, prompt: Messages, schema: type[Model],
                      **params: Any) -> Model:  # fmt: skip
        params.setdefault("response_format", {"type": "json_object"})
        return _parse(schema, self.generate_text(model, prompt, **params))

    def stream(self, model: str, prompt: Messages, **params: Any) -> Iterator[str]:
        """The answer's text as it arrives; closing the iterator early drops the stream (the
        proxy then charges what was streamed)."""
        chunks = self.openai.chat.completions.create(
            model=model, messages=_messages(prompt), stream=True,
            extra_headers=billing_headers(), **params,
        )  # fmt: skip
        try:
            for chunk in chunks:
                if chunk.choices and chunk.choices[0].delta.content:
                    yield chunk.choices[0].delta.content
        finally:
            chunks.close()

    def close(self) -> None:
        self.openai.close()


class AsyncLLMClient:
    """The asyncio twin of :class:`LLMClient`."""

    def __init__(self, base_url: str, api_key: str, *, timeout: float = 120.0,
                 max_retries: int = 2) -> None:  # fmt: skip
        self.openai = openai.AsyncOpenAI(base_url=base_url, api_key=api_key, timeout=timeout,
                                         max_retries=max_retries)  # fmt: skip

    async def generate_text(self, model: str, prompt: Messages, **params: Any) -> str:
        answer = await self.openai.chat.completions.create(
            model=model, messages=_messages(prompt), extra_headers=billing_headers(), **params
        )
        return answer.choices[0].message.content or ""

    async def generate_json(self, model: str, prompt: Messages, schema: type[Model],
                            **params: Any) -> Model:  # fmt: skip
        params.setdefault("response_format", {"type": "json_object"})
        return _parse(schema, await self.generate_text(model, prompt, **params))

    async def stream(self, model: str, prompt: Messages, **params: Any) -> AsyncIterator[str]:
        chunks = await self.openai.chat.completions.create(
            model=model, messages=_messages(prompt), stream=True,
            extra_headers=billing_headers(), **params,
        )  # fmt: skip
        try:
            async for chunk in chunks:
                if chunk.choices and chunk.choices[0].delta.content:
                    yield chunk.choices[0].delta.content
        finally:
            await chunks.close()

    async def close(self) -> None:
        await self.openai.close()
