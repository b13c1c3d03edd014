"""ASGI pieces every HTTP face of the project shares (the credit store, the plan plaza).

- :class:`BodyLimit` refuses an over-long request body with 413 before anything parses it;
- :func:`page_router` serves a plain page (``index.html``, ``app.js``, ``style.css``);
- :data:`PAGE_HEADERS` are the security headers of the plain HTML pages: scripts only from
  the page's own origin (so an injected ``<script>`` in user text could never run even if
  it were rendered as HTML), no framing, no referrer.
"""

from __future__ import annotations

from html import escape
from pathlib import Path

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
