"""What the benchmarks share: the command line, a closed-loop HTTP load generator,
percentiles and CPU accounting. Their server processes run in a
:class:`stack.processes.ProcessGroup`, as the tests' do."""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import resource
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

TICKS_PER_S = os.sysconf("SC_CLK_TCK")


def bench_parser(doc: str | None, seconds: float = 10.0) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=seconds, help="per measurement")
    return parser


def _proc_cpu() -> list[tuple[str, int, float]]:
    """(command, process group, CPU seconds) of every process we can read."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            raw = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue  # gone meanwhile
        name = raw[raw.index("(") + 1 : raw.rindex(")")]
        fields = raw[raw.rindex(")") + 2 :].split()
        # after the name: state ppid pgrp session ... utime (11) stime (12), in ticks
        found.append((name, int(fields[2]), (int(fields[11]) + int(fields[12])) / TICKS_PER_S))
    return found


class CpuMeter:
    """CPU used between :meth:`start` and :meth:`stop` by the server's process group, by
    Postgres, by Redis and by this (load-generating) process, as % of one core."""

    def __init__(self, server_pgid: int) -> None:
        self.server_pgid = server_pgid
        self._start: dict[str, float] = {}

    def _sample(self) -> dict[str, float]:
        totals = {"server": 0.0, "postgres": 0.0, "redis": 0.0}
        for name, pgid, seconds in _proc_cpu():
            if pgid == self.server_pgid:
                totals["server"] += seconds
            elif name == "postgres":
                totals["postgres"] += seconds
            elif name.startswith("redis-server"):
                totals["redis"] += seconds
        # This process and the load generators it ran (wrk): children count once reaped.
        own = resource.getrusage(resource.RUSAGE_SELF)
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        totals["load generator"] = (own.ru_utime + own.ru_stime + children.ru_utime
                                    + children.ru_stime)  # fmt: skip
        return totals

    def start(self) -> None:
        self._start = self._sample()

    def stop(self, seconds: float) -> dict[str, float]:
        end = self._sample()
        return {k: 100 * (end[k] - self._start.get(k, 0.0)) / seconds for k in end}


class Connection:
    """One keep-alive HTTP/1.1 connection; enough of the protocol for JSON and SSE replies."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(self, head: bytes, body: bytes) -> int:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        assert self.reader is not None
        self.writer.write(head + body)
        status = int((await self.reader.readline()).split(b" ", 2)[1])
        length, chunked = -1, False
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding" and b"chunked" in value.lower():
                chunked = True
        if chunked:
            while True:
                size = int((await self.reader.readline()).split(b";")[0], 16)
                await self.reader.readexactly(size + 2)
                if size == 0:
                    break
        elif length >= 0:
            await self.reader.readexactly(length)
        else:  # no length: the body ends with the connection
            await self.reader.read()
            self.writer.close()
            self.writer = None
        return status


async def run_clients(port: int, make_request: Callable[[int], tuple[bytes, bytes]],
                      clients: int, seconds: float,
                      stagger_s: float = 0.0) -> tuple[list[float], int]:  # fmt: skip
    """``clients`` keep-alive connections in a closed loop for ``seconds``: each sends its
    next request (head and body from ``make_request(n)``) when the last one is answered.
    Latencies (ms) of the 200s, and the number of failures. Client i starts
    ``i / clients * stagger_s`` late."""
    latencies: list[float] = []
    failures = 0
    counter = itertools.count()
    stop_at = time.monotonic() + seconds

    async def client(i: int) -> None:
        nonlocal failures
        await asyncio.sleep(i / clients * stagger_s)
        connection = Connection(port)
        while time.monotonic() < stop_at:
            head, body = make_request(next(counter))
            started = time.perf_counter()
            try:
                status = await connection.request(head, body)
            except (OSError, asyncio.IncompleteReadError, ValueError):
                connection = Connection(port)
                failures += 1
                continue
            if status == 200:
                latencies.append((time.perf_counter() - started) * 1000)
            else:
                failures += 1

    await asyncio.gather(*(client(i) for i in range(clients)))
    return latencies, failures


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


@dataclass
class LoadResult:
    """One closed-loop run: answered requests (200s), failures and latencies in ms."""

    ok: int
    failed: int
    p50_ms: float
    p99_ms: float
    max_ms: float


WRK_SCRIPT = Path(__file__).with_name("wrk_requests.lua")


def wrk_available() -> bool:
    return shutil.which("wrk") is not None


def run_wrk(port: int, paths: list[str], tokens: list[bytes], clients: int,
            seconds: float, method: str = "GET") -> LoadResult:  # fmt: skip
    """The same closed loop as :func:`run_clients` (``clients`` keep-alive connections, a
    random path and token per request), driven by ``wrk``: a standard load generator, so
    the figures do not rest on our own HTTP client. Latencies are wrk's (all responses)."""
    with tempfile.NamedTemporaryFile("wb", suffix=".tokens") as token_file, \
            tempfile.NamedTemporaryFile("w", suffix=".paths") as path_file:  # fmt: skip
        token_file.write(b"\n".join(tokens) + b"\n")
        token_file.flush()
        path_file.write("\n".join(paths) + "\n")
        path_file.flush()
        env = {**os.environ, "WRK_TOKENS": token_file.name, "WRK_PATHS_FILE": path_file.name,
               "WRK_METHOD": method}  # fmt: skip
        command = ["wrk", f"-t{min(2, clients)}", f"-c{clients}", f"-d{max(1, round(seconds))}s",
                   "-s", str(WRK_SCRIPT), f"http://127.0.0.1:{port}"]  # fmt: skip
        done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"wrk failed ({done.returncode}): {done.stderr.strip() or done.stdout}")
    figures = json.loads(lines[-1])
    failed = figures["non_2xx"] + figures["errors"]
    return LoadResult(figures["requests"] - figures["non_2xx"], failed,
                      figures["p50_us"] / 1000, figures["p99_us"] / 1000,
                      figures["max_us"] / 1000)  # fmt: skip


def summarize(latencies: list[float], failures: int) -> LoadResult:
    """:func:`run_clients`' output as a :class:`LoadResult`."""
    return LoadResult(len(latencies), failures, pct(latencies, 0.5), pct(latencies, 0.99),
                      max(latencies, default=float("nan")))  # fmt: skip


def http_load(tool: str, port: int, paths: list[str], tokens: list[bytes], clients: int,
              seconds: float, method: str = "GET") -> LoadResult:  # fmt: skip
    """A closed loop of ``clients`` on ``port``: ``method`` on a random path of ``paths``
    with a random bearer token of ``tokens``, from ``wrk`` or this module's Python client
    (``tool``)."""
    if tool == "wrk":
        return run_wrk(port, paths, tokens, clients, seconds, method)
    import random

    import uvloop

    def request(_: int) -> tuple[bytes, bytes]:
        head = (f"{method} {random.choice(paths)} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                "Content-Length: 0\r\n".encode()
                + b"Authorization: Bearer " + random.choice(tokens) + b"\r\n\r\n")  # fmt: skip
        return head, b""

    return summarize(*uvloop.run(run_clients(port, request, clients, seconds)))


def load_tool(parser: argparse.ArgumentParser, choice: str) -> str:
    """``--load``'s tool: wrk when installed (auto), else the Python client."""
    tool = choice if choice != "auto" else ("wrk" if wrk_available() else "python")
    if tool == "wrk" and not wrk_available():
        parser.error("wrk is not installed: `./dev bench` installs it, or use --load python")
    return tool
