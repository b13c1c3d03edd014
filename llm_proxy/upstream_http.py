"""A lean HTTP/1.1 keep-alive transport for the ``openai`` SDK's async client.

The SDK keeps doing what it is there for (retries with backoff, timeouts, error
mapping); this only replaces the bottom layer, httpx's default connection pool,
which costs about 0.4 ms of CPU per call on this machine: the proxy's whole
per-call budget is not much more. This one is asyncio ``Protocol`` objects
with httptools' C parser (the parser uvicorn uses for the other side), a pool
of idle connections per origin, and nothing else: no HTTP/2, no proxies from
the environment (``proxy.upstream_transport: httpx`` selects httpx's own pool
for those).

Behaviour worth knowing:

- the timeouts come from each request (``connect``, ``read``, ``pool``), as
  httpx's own transport takes them, and raise httpx's exceptions, so the SDK
  retries and maps them as usual;
- a reused idle connection that turns out closed before any byte of the
  answer arrived is retried once on a fresh connection (the server dropped it
  while idle and never saw the request); every other failure goes up to the
  SDK;
- the body is streamed as it arrives, with back-pressure on the socket, and a
  connection goes back to the pool only after its answer was read completely.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
from collections.abc import AsyncIterator
from typing import Any, cast

import httptools
import httpx2

PAUSE_AT = 256 * 1024  # bytes buffered before the socket stops being read
IDLE_PER_ORIGIN = 512

Origin = tuple[bytes, str, int]


class _Connection(asyncio.Protocol):
    """One HTTP/1.1 connection: one request at a time, the answer parsed as it arrives."""

    def __init__(self, origin: Origin) -> None:
        self.origin = origin
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.used = False  # has carried a request before (a reused keep-alive connection)
        self._reset()

    def _reset(self) -> None:
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.headers_done = False
        self.complete = False
        self.keep_alive = False
        self.received_any = False
        self.error: Exception | None = None
        self.chunks: collections.deque[bytes] = collections.deque()
        self.buffered = 0
        self.paused = False
        self.waiter: asyncio.Future[None] | None = None

    # -- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport, but implement it.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.received_any = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(httpx2.RemoteProtocolError(f"malformed answer from upstream: {exc}"))
            self.close()

    def eof_received(self) -> bool | None:
        return None  # close the transport; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.complete:
            return
        framed = any(name.lower() in (b"content-length", b"transfer-encoding")
                     for name, _ in self.headers)  # fmt: skip
        if self.headers_done and not framed and exc is None:
            # An answer without length or chunking ends with the connection.
            self.complete = True
            self._wake()
        else:
            self._fail(httpx2.RemoteProtocolError(
                "upstream closed the connection before the answer was complete"
            ))  # fmt: skip

    # -- httptools callbacks ---------------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if 100 <= status < 200:  # an interim answer (100 Continue): the real one follows
            self.headers = []
            return
        self.status = status
        self.headers_done = True
        self._wake()

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)
        self.buffered += len(body)
        if self.buffered > PAUSE_AT and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if not self.headers_done:
            return  # the end of an interim answer
        # Asked here: once the parser moved past the message it no longer knows.
        self.keep_alive = self.parser.should_keep_alive()
        self.complete = True
        self._wake()

    # -- used by the transport -------------------------------------------------------------

    def _wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def _fail(self, exc: Exception) -> None:
        if self.error is None:
            self.error = exc
        self._wake()

    async def _wait(self, timeout: float | None) -> None:
        loop = asyncio.get_running_loop()
        waiter = self.waiter = loop.create_future()
        timer = None if timeout is None else loop.call_later(timeout, self._expire, waiter)
        try:
            await waiter  # raises ReadTimeout when the timer fires first
        finally:
            self.waiter = None
            if timer is not None:
                timer.cancel()

    def _expire(self, waiter: asyncio.Future[None]) -> None:
        if not waiter.done():
            waiter.set_exception(httpx2.ReadTimeout("no data from upstream in time"))
            self.close()

    def send(self, data: bytes) -> None:
        self._reset()
        self.used = True
        assert self.transport is not None
        self.transport.write(data)

    async def head(self, timeout: float | None) -> None:
        while not self.headers_done:
            if self.error is not None:
                raise self.error
            await self._wait(timeout)

    async def next_chunk(self, timeout: float | None) -> bytes:
        """The next piece of the body; b"" once it is complete."""
        while True:
            if self.chunks:
                chunk = self.chunks.popleft()
                self.buffered -= len(chunk)
                if self.paused and self.buffered < PAUSE_AT // 2 and self.transport is not None:
                    self.paused = False
                    self.transport.resume_reading()
                return chunk
            if self.complete:
                return b""
            if self.error is not None:
                raise self.error
            await self._wait(timeout)

    def reusable(self) -> bool:
        return (not self.closed and self.complete and self.keep_alive
                and self.transport is not None and not self.transport.is_closing())  # fmt: skip

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class _Body(httpx2.AsyncByteStream):
    def __init__(self, owner: LeanTransport, connection: _Connection,
                 timeout: float | None) -> None:  # fmt: skip
        self.owner = owner
        self.connection = connection
        self.timeout = timeout
        self.done = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            while chunk := await self.connection.next_chunk(self.timeout):
                yield chunk
        except BaseException:
            self._finish()
            raise
        self._finish()

    async def aclose(self) -> None:
        self._finish()

    def _finish(self) -> None:
        if not self.done:
            self.done = True
            self.owner._release(self.connection)


class LeanTransport(httpx2.AsyncBaseTransport):
    def __init__(self, *, max_connections: int = 2000,
                 ssl_context: ssl.SSLContext | None = None) -> None:  # fmt: skip
        self._idle: dict[Origin, collections.deque[_Connection]] = {}
        self._slots = asyncio.Semaphore(max_connections)
        self._ssl_context = ssl_context
        self._closed = False

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        if self._closed:
            raise httpx2.ConnectError("the upstream transport is closed")
        timeouts: dict[str, float | None] = request.extensions.get("timeout", {})
        url = request.url
        scheme = url.raw_scheme
        if scheme not in (b"http", b"https"):
            raise httpx2.UnsupportedProtocol(f"unsupported URL scheme {scheme!r}")
        port = url.port or (443 if scheme == b"https" else 80)
        origin: Origin = (scheme, url.host, port)
        body = await request.aread()
        data = self._serialize(request, body)
        if self._slots.locked():  # wait_for costs a task: only when there is a queue
            try:
                await asyncio.wait_for(self._slots.acquire(), timeouts.get("pool"))
            except TimeoutError as exc:
                raise httpx2.PoolTimeout("no free upstream connection slot") from exc
        else:
            await self._slots.acquire()
        try:
            connection = await self._exchange(origin, data, timeouts)
        except BaseException:
            self._slots.release()
            raise
        return httpx2.Response(
            connection.status, headers=connection.headers,
            stream=_Body(self, connection, timeouts.get("read")),
            extensions={"http_version": b"HTTP/1.1", "reason_phrase": b""}, request=request,
        )  # fmt: skip

    async def _exchange(self, origin: Origin, data: bytes,
                        timeouts: dict[str, float | None]) -> _Connection:  # fmt: skip
        """Send the request and wait for the answer's head, on an idle connection if any."""
        connection = self._take_idle(origin)
        if connection is not None:
            connection.send(data)
            try:
                await connection.head(timeouts.get("read"))
                return connection
            except httpx2.RemoteProtocolError:
                if connection.received_any:
                    raise
                connection.close()  # dropped while idle: the server never saw this request
        connection = await self._connect(origin, timeouts.get("connect"))
        connection.send(data)
        try:
            await connection.head(timeouts.get("read"))
        except BaseException:
            connection.close()
            raise
        return connection

    def _take_idle(self, origin: Origin) -> _Connection | None:
        idle = self._idle.get(origin)
        while idle:
            connection = idle.pop()
            if not connection.closed and connection.transport is not None \
                    and not connection.transport.is_closing():  # fmt: skip
                return connection
        return None

    async def _connect(self, origin: Origin, timeout: float | None) -> _Connection:
        scheme, host, port = origin
        context: ssl.SSLContext | None = None
        if scheme == b"https":
            if self._ssl_context is None:
                self._ssl_context = httpx2.create_ssl_context()
            context = self._ssl_context
        loop = asyncio.get_running_loop()
        try:
            _, protocol = await asyncio.wait_for(loop.create_connection(
                lambda: _Connection(origin), host, port, ssl=context,
                server_hostname=host if context is not None else None,
            ), timeout)  # fmt: skip
        except TimeoutError as exc:
            raise httpx2.ConnectTimeout(f"connecting to {host}:{port} took over {timeout} s") \
                from exc  # fmt: skip
        except OSError as exc:
            raise httpx2.ConnectError(f"cannot connect to {host}:{port}: {exc}") from exc
        return protocol

    @staticmethod
    def _serialize(request: httpx2.Request, body: bytes) -> bytes:
        target = request.url.raw_path or b"/"
        lines = [request.method.encode("ascii"), b" ", target, b" HTTP/1.1\r\n"]
        for name, value in request.headers.raw:
            lines += (name, b": ", value, b"\r\n")
        lines += (b"\r\n", body)
        return b"".join(lines)

    def _release(self, connection: _Connection) -> None:
        self._slots.release()
        if self._closed or not connection.reusable():
            connection.close()
            return
        idle = self._idle.setdefault(connection.origin, collections.deque())
        if len(idle) >= IDLE_PER_ORIGIN:
            connection.close()
        else:
            idle.append(connection)

    async def aclose(self) -> None:
        self._closed = True
        for idle in self._idle.values():
            while idle:
                idle.pop().close()


def lean_http_client(*, max_connections: int = 2000, **kwargs: Any) -> httpx2.AsyncClient:
    """An ``httpx2.AsyncClient`` on :class:`LeanTransport`, to hand to ``openai.AsyncOpenAI``."""
    return httpx2.AsyncClient(transport=LeanTransport(max_connections=max_connections), **kwargs)
