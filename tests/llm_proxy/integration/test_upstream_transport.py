"""The lean upstream transport against a real HTTP server on loopback.

The server is a few lines of asyncio whose every answer is scripted, so each
framing (length, chunked, until close), keep-alive reuse, a connection the
server dropped while idle, an answer cut off, a slow answer and a refused
connection can be provoked on purpose. Then once more through the ``openai``
SDK, to show that its retries sit on top of this transport unchanged.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import httpx2
import openai
import pytest

from llm_proxy.upstream_http import LeanTransport

Handler = Callable[[bytes, asyncio.StreamWriter], Awaitable[bool]]  # -> keep the connection


class ScriptedServer:
    """Answers each request with the next handler; counts connections and requests."""

    def __init__(self, handlers: list[Handler]) -> None:
        self.handlers = handlers
        self.connections = 0
        self.requests: list[bytes] = []
        self.server: asyncio.Server | None = None
        self.writers: list[asyncio.StreamWriter] = []

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.append(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                body = await reader.readexactly(length)
                self.requests.append(head + body)
                if not await self.handlers[len(self.requests) - 1](body, writer):
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def close(self) -> None:
        for writer in self.writers:
            writer.close()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


def fixed(body: bytes, *, status: int = 200, close: bool = False) -> Handler:
    async def handler(_: bytes, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 %d X\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (status, len(body), body))  # fmt: skip
        await writer.drain()
        return not close

    return handler


def chunked(parts: list[bytes], pause_s: float = 0.0) -> Handler:
    async def handler(_: bytes, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for part in parts:
            writer.write(b"%x\r\n%s\r\n" % (len(part), part))
            await writer.drain()
            await asyncio.sleep(pause_s)
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        return True

    return handler


def until_close(body: bytes) -> Handler:
    async def handler(_: bytes, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + body)
        await writer.drain()
        return False

    return handler


def cut_off(body: bytes) -> Handler:
    async def handler(_: bytes, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body) * 2, body))
        await writer.drain()
        return False  # closes with half the promised body sent

    return handler


def silent(seconds: float) -> Handler:
    async def handler(_: bytes, writer: asyncio.StreamWriter) -> bool:
        await asyncio.sleep(seconds)
        return False

    return handler


def drop_idle() -> Handler:
    """Closes the connection without answering, as a server does with an idle one."""

    async def handler(_: bytes, writer: asyncio.StreamWriter) -> bool:
        return False

    return handler


async def with_server(handlers: list[Handler],
                      body: Callable[[httpx2.AsyncClient, str, ScriptedServer], Awaitable[None]],
                      ) -> ScriptedServer:  # fmt: skip
    server = ScriptedServer(handlers)
    port = await server.start()
    client = httpx2.AsyncClient(transport=LeanTransport())
    try:
        await body(client, f"http://127.0.0.1:{port}", server)
    finally:
        await client.aclose()
        await server.close()
    return server


def test_keep_alive_reuses_one_connection_for_every_framing() -> None:
    async def body(client: httpx2.AsyncClient, url: str, server: ScriptedServer) -> None:
        first = await client.post(url + "/a", content=b'{"n":1}')
        assert first.status_code == 200
        assert first.content == b'{"ok":1}'
        second = await client.post(url + "/b", content=b"x" * 100_000)
        assert second.content == b"hello world"
        third = await client.get(url + "/c")
        assert third.status_code == 404

    handlers = [fixed(b'{"ok":1}'), chunked([b"hello ", b"world"]), fixed(b"{}", status=404)]
    server = asyncio.run(with_server(handlers, body))
    assert server.connections == 1
    assert len(server.requests) == 3
    assert server.requests[1].endswith(b"x" * 100_000)


def test_a_streamed_answer_arrives_piece_by_piece() -> None:
    parts = [b"data: %d\n\n" % n for n in range(5)]

    async def body(client: httpx2.AsyncClient, url: str, server: ScriptedServer) -> None:
        async with client.stream("POST", url, content=b"{}") as response:
            got = [chunk async for chunk in response.aiter_raw()]
        assert b"".join(got) == b"".join(parts)
        assert len(got) >= 3, "the body was buffered instead of streamed"

    asyncio.run(with_server([chunked(parts, pause_s=0.02)], body))


def test_an_answer_without_length_ends_with_the_connection() -> None:
    async def body(client: httpx2.AsyncClient, url: str, server: ScriptedServer) -> None:
        assert (await client.post(url, content=b"{}")).content == b"the whole answer"
        assert (await client.post(url, content=b"{}")).content == b"{}"

    server = asyncio.run(with_server([until_close(b"the whole answer"), fixed(b"{}")], body))
    assert server.connections == 2  # the first one could not be reused


def test_a_connection_dropped_while_idle_is_retried_on_a_fresh_one() -> None:
    async def body(client: httpx2.AsyncClient, url: str, server: ScriptedServer) -> None:
        assert (await client.post(url, content=b"{}")).content == b"1"
        # The server drops the idle connection as the next request arrives on it.
        assert (await client.post(url, content=b"{}")).content == b"2"

    server = asyncio.run(with_server([fixed(b"1"), drop_idle(), fixed(b"2")], body))
    assert server.connections == 2
    assert len(server.requests) == 3


def test_an_answer_cut_off_is_an_error_not_a_short_body() -> None:
    async def body(client: httpx2.AsyncClient, url: str, server: ScriptedServer) -> None:
        with pytest.raises(httpx2.RemoteProtocolError):
            await client.post(url, content=b"{}")

    asyncio.run(with_server([cut_off(b"half")], body))


def test_a_silent_upstream_times_out() -> None:
    async def body(client: httpx2.AsyncClient, url: str, server: ScriptedServer) -> None:
        with pytest.raises(httpx2.ReadTimeout):
            await client.post(url, content=b"{}", timeout=httpx2.Timeout(5.0, read=0.2))

    asyncio.run(with_server([silent(2.0)], body))


def test_a_refused_connection_is_a_connect_error() -> None:
    async def run() -> None:
        client = httpx2.AsyncClient(transport=LeanTransport())
        with pytest.raises(httpx2.ConnectError):
            await client.post("http://127.0.0.1:9/v1", content=b"{}")
        await client.aclose()

    asyncio.run(run())


def test_the_sdk_retries_a_5xx_over_this_transport() -> None:
    async def run() -> ScriptedServer:
        server = ScriptedServer([fixed(b'{"error":{"message":"busy"}}', status=503),
                                 fixed(b'{"id":"ok"}')])  # fmt: skip
        port = await server.start()
        client = openai.AsyncOpenAI(
            base_url=f"http://127.0.0.1:{port}/v1", api_key="k", max_retries=2,
            http_client=httpx2.AsyncClient(transport=LeanTransport()),
        )  # fmt: skip
        try:
            response = await client.post("/chat/completions", cast_to=httpx2.Response,
                                         content=b"{}", stream=True)  # fmt: skip
            assert await response.aread() == b'{"id":"ok"}'
            await response.aclose()
        finally:
            await client.close()
            await server.close()
        return server

    server = asyncio.run(run())
    assert len(server.requests) == 2
    assert b"x-stainless-retry-count: 1" in server.requests[1].lower()
