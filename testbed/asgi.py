"""Driving an ASGI app in process: what the fast-path tests (the store's hot reads, the
plaza's fast path) use to see which requests a fast path answers and which it hands on."""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any

from starlette.types import ASGIApp

HANDED_ON = 299  # the status Downstream answers with: no real route uses it


class Downstream:
    """Stands in for the FastAPI app behind a fast path and records what reaches it."""

    def __init__(self) -> None:
        self.paths: list[str] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        self.paths.append(scope["path"] + "?" + scope["query_string"].decode())
        await send({"type": "http.response.start", "status": HANDED_ON, "headers": []})
        await send({"type": "http.response.body", "body": b"downstream"})


def http_scope(path: str, query: str = "", token: str | None = None,
               method: str = "GET") -> dict[str, Any]:  # fmt: skip
    """An HTTP request's ASGI scope, with a bearer token if given."""
    headers = [] if token is None else [(b"authorization", f"Bearer {token}".encode())]
    return {"type": "http", "method": method, "path": path, "query_string": query.encode(),
            "headers": headers}  # fmt: skip


async def status_of(app: ASGIApp, scope: dict[str, Any]) -> int:
    """The status ``app`` answers ``scope`` with (an empty request body)."""
    sent: list[MutableMapping[str, Any]] = []

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(message)

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    await app(scope, receive, send)
    return int(sent[0]["status"])
