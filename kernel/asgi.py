"""ASGI pieces every HTTP face of the project shares (the credit store, the plan plaza).

- :class:`BodyLimit` refuses an over-long request body with 413 before anything parses it;
- :func:`page_router` serves a plain page (``index.html``, ``app.js``, ``style.css``);
- :data:`PAGE_HEADERS` are the security headers of the plain HTML pages: scripts only from
  the page's own origin (so an injected ``<script>`` in user text could never run even if
  it were rendered as HTML), no framing, no referrer;
- :class:`Fallback`, :func:`query_of`, :func:`only`, :func:`bearer_of` and :func:`send_json`
  are what a fast path ahead of FastAPI needs (the store's hot reads, the plaza's): it
  answers only a request it can answer exactly as the route would, and hands anything
  else to the route with :class:`Fallback`.
"""

from __future__ import annotations

from html import escape
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import orjson
from fastapi import APIRouter
from starlette.responses import FileResponse, HTMLResponse, JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kernel.errors import NotFound

PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
    "connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
}


class Fallback(Exception):
    """This request is not one the fast path answers; the FastAPI route will."""


Query = dict[str, str]
JSON_HEADERS = [(b"content-type", b"application/json")]


def query_of(scope: Scope) -> Query:
    """The query string's parameters; Fallback when it is malformed or repeats one (how
    FastAPI reads a repeated parameter decides)."""
    raw: bytes = scope["query_string"]
    if not raw:
        return {}
    try:
        pairs = parse_qsl(raw.decode("latin-1"), keep_blank_values=True, strict_parsing=True,
                          errors="strict")  # fmt: skip
    except (ValueError, UnicodeDecodeError) as exc:
        raise Fallback from exc
    query = dict(pairs)
    if len(query) != len(pairs):
        raise Fallback
    return query


def only(query: Query, allowed: tuple[str, ...]) -> None:
    """Fallback unless every parameter is one of ``allowed``."""
    if any(name not in allowed for name in query):
        raise Fallback


def bounded_int(text: str | None, default: int, low: int, high: int) -> int:
    """An integer parameter as FastAPI would take it when it is plain digits in range;
    anything else (signs, spaces, out of range) is the route's to refuse."""
    if text is None:
        return default
    if not text.isascii() or not text.isdigit() or not low <= int(text) <= high:
        raise Fallback
    return int(text)


def bearer_of(scope: Scope) -> str:
    """The bearer token of the request's ``Authorization`` header; Fallback without one."""
    for name, value in scope["headers"]:
        if name == b"authorization":
            text: str = value.decode("latin-1")
            scheme, _, token = text.partition(" ")
            token = token.strip()
            if scheme.lower() != "bearer" or not token:
                raise Fallback
            return token
    raise Fallback


async def send_json(send: Send, value: Any, status: int = 200) -> None:
    """``value`` as the JSON reply (orjson, times in UTC with a ``Z``)."""
    body = orjson.dumps(value, option=orjson.OPT_UTC_Z)
    headers = [*JSON_HEADERS, (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def json_error(status: int, code: str, message: str) -> JSONResponse:
    """The project's error body: ``{"error": {"code", "message"}}``."""
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status)


class BodyLimit:
    """Refuse a request body over ``limit`` bytes with 413, before anything parses it.

    The payment callback takes no token, so without this anyone could make the store hold
    any body in memory. The body (at most ``limit`` bytes) is read here, then replayed to
    the app; requests without a body pass straight through."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            await self._too_large(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                await self._too_large(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = json_error(413, "request_too_large", f"request bodies are limited to "
                         f"{self.limit} bytes")  # fmt: skip
        await response(scope, receive, send)


PAGE_FILES = {"app.js": "text/javascript", "style.css": "text/css"}


def page_router(prefix: str, page_dir: Path, links: dict[str, str]) -> APIRouter:
    """``prefix`` and ``prefix/`` answer ``index.html`` (each ``{{name}}`` in it replaced by
    ``links[name]``, HTML-escaped) with :data:`PAGE_HEADERS`; ``prefix/static/`` its files."""
    html = (page_dir / "index.html").read_text()
    for name, url in links.items():
        html = html.replace("{{" + name + "}}", escape(url, quote=True))
    router = APIRouter()

    @router.get(prefix, include_in_schema=False)
    @router.get(f"{prefix}/", include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(html, headers=PAGE_HEADERS)

    @router.get(f"{prefix}/static/{{name}}", include_in_schema=False)
    async def static(name: str) -> FileResponse:
        if name not in PAGE_FILES:
            raise NotFound("not_found", f"no file {name!r}")
        return FileResponse(page_dir / name, media_type=PAGE_FILES[name])

    return router
