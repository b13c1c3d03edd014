"""What the LLM proxy adds to a call, against the fake upstream called directly, and LiteLLM.

    .venv/bin/python -m bench.proxy [--seconds 10] [--latency-ms 1000] [--litellm PATH]
                                    [--baseline GIT_REF]

For each of non-streamed and streamed chat calls, at 50 and 200 concurrent
clients (closed loop: each client sends its next call when the last one
ends), the same load goes to the fake upstream directly, through this proxy
(auth, billing headers, guard hold in Redis, usage, price, outbox INSERT in
Postgres, settle), through this proxy without X-Billing-Event-Id (target
"generated-id": the proxy makes an id up and does not remember it, so no
fingerprint is checked or recorded in Redis: the difference to "creditledger" is
what the event-id check costs), and through LiteLLM's proxy (no database) when it
is installed. "Added" is the proxy's percentile minus the direct one.
``--baseline REF`` also runs the proxy of another commit (a git worktree of it, same
database, Redis and load) as target "baseline", so a change's cost is measured
against its parent in one run, row after row, not across hours.

The fake upstream waits ``--latency-ms`` before answering (1 s by default: an
LLM call is slow, and a closed loop of 200 clients against a faster upstream
would measure this machine's CPU, shared by all three processes and the load
generator, rather than per-call overhead). Max sustained RPS is measured
separately with a 0 ms upstream. Guard decision latency is timed in process
against real Redis.

The load generator is a minimal HTTP/1.1 keep-alive client on asyncio, so the
client's own cost stays small and identical for every target. Needs the stack
up (`creditledger stack up`); it uses its own database (bench_proxy) and
Redis prefix. LiteLLM: install it apart (its pins clash with ours), e.g.
``python3 -m venv /tmp/litellm-venv && /tmp/litellm-venv/bin/pip install
'litellm[proxy]'``, and pass ``--litellm /tmp/litellm-venv/bin/litellm``.
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import yaml

from bench.common import bench_parser, pct, run_clients
from creditledger.tables import render_table
from kernel.db import connect
from kernel.settings import Settings, load_settings
from llm_proxy.auth import new_key
from llm_proxy.fake_upstream import set_behaviour
from projections.migrate import migrate
from stack.processes import ProcessGroup, wait_http

USERS = 1000
PREFIX = "bench-proxy"
DATABASE = "bench_proxy"


@dataclass(frozen=True)
class Target:
    name: str
    port: int
    path: str  # chat completions path
    headers: bytes  # extra request headers (auth, ...)
    billing: bool  # send the billing headers
    event_ids: bool = True  # with billing: a fresh X-Billing-Event-Id per call (else the
    # proxy makes one up, which it does not remember: no fingerprint record in Redis)


def request_bytes(target: Target, stream: bool, n: int) -> tuple[bytes, bytes]:
    body = orjson.dumps({
        "model": "chat" if target.name != "direct" else "fake-small",
        "messages": [{"role": "user", "content": f"benchmark question {n} answer briefly"}],
        "stream": stream,
    })  # fmt: skip
    user = f"bench-u{n % USERS}"
    event_id = (f"X-Billing-Event-Id: bench-{os.getpid()}-{n}-{random.getrandbits(32)}\r\n"
                if target.event_ids else "")  # fmt: skip
    billing = (f"X-Billing-User-Id: {user}\r\nX-Billing-Scene: chat\r\n{event_id}"
               if target.billing else "")  # fmt: skip
    head = (
        f"POST {target.path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n{billing}"
    )
    return head.encode() + target.headers + b"\r\n", body


async def closed_loop(target: Target, clients: int, seconds: float, stream: bool,
                      stagger_s: float = 0.0) -> tuple[list[float], int]:  # fmt: skip
    """Latencies (ms) of the calls that ended with 200, and the number of failures.

    Client i starts ``i / clients * stagger_s`` late: with a constant upstream latency,
    clients started together would stay in lock-step and hit the proxy in synchronized
    bursts, which measures a burst's queue rather than what one call costs."""
    return await run_clients(target.port, lambda n: request_bytes(target, stream, n), clients,
                             seconds, stagger_s)  # fmt: skip


def set_upstream(port: int, **fields: object) -> None:
    set_behaviour(f"http://127.0.0.1:{port}", **fields)


def wait_up(url: str, process: subprocess.Popen[bytes], timeout: float = 120) -> None:
    if not wait_http(url, process, timeout):
        raise SystemExit(f"{url} did not come up in {timeout} s (exit code {process.poll()})")


def prepare_world(settings: Settings, workdir: Path, upstream_port: int,
                  proxy_port: int) -> tuple[Settings, str, dict[str, str]]:  # fmt: skip
    """A database and Redis prefix of its own, users with a large balance, a config file."""
    import redis

    from contracts.redis_keys import balance_key

    with connect(settings, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {DATABASE} WITH (FORCE)".encode())
        conn.execute(f"CREATE DATABASE {DATABASE}".encode())
    dsn = settings.postgres_dsn.rsplit("/", 1)[0] + f"/{DATABASE}"
    world = load_settings(postgres={"url": dsn}, projections={"redis_key_prefix": PREFIX})
    migrate(world)
    client = redis.Redis.from_url(settings.redis_url)
    for key in client.scan_iter(match=f"{PREFIX}:*", count=1000):
        client.delete(key)
    pipe = client.pipeline()
    for n in range(USERS):
        pipe.hset(balance_key(PREFIX, f"bench-u{n}"),
                  mapping={"balance_micro": 10**15, "seq": 1, "updated_at_ms": 0})  # fmt: skip
    pipe.execute()
    client.close()
    key, digest = new_key()
    rules = workdir / "price_rules.yaml"
    rules.write_text(yaml.safe_dump({"price_rules": [{"id": "bench", "versions": [{
        "version": 1, "effective_from": "2026-01-01T00:00:00Z", "input": "0.5",
        "output": "1.5"}]}]}))  # fmt: skip
    config = workdir / "proxy.yaml"
    config.write_text(yaml.safe_dump({"proxy": {
        "port": proxy_port, "price_rules_file": str(rules),
        "models": [{"alias": "chat", "upstream_base_url": f"http://127.0.0.1:{upstream_port}/v1",
                    "upstream_model": "fake-small", "price_rule": "bench"}],
        "services": [{"name": "bench", "key_sha256": digest, "scenes": ["chat"]}],
    }}))  # fmt: skip
    env = {**os.environ, "CREDITLEDGER_CONFIG": str(config),
           "CREDITLEDGER_POSTGRES__URL": dsn,
           "CREDITLEDGER_PROJECTIONS__REDIS_KEY_PREFIX": PREFIX}  # fmt: skip
    env.pop("DATABASE_URL", None)
    return world, key, env


def start_litellm(binary: str, workdir: Path, upstream_port: int,
                  port: int) -> subprocess.Popen[bytes]:  # fmt: skip
    config = workdir / "litellm.yaml"
    config.write_text(yaml.safe_dump({
        "model_list": [{"model_name": "chat", "litellm_params": {
            "model": "openai/fake-small", "api_base": f"http://127.0.0.1:{upstream_port}/v1",
            "api_key": "unused"}}],
        "general_settings": {"master_key": "sk-bench"},
        "litellm_settings": {"telemetry": False, "drop_params": True},
    }))  # fmt: skip
    log = (workdir / "litellm.log").open("ab")
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    return subprocess.Popen([binary, "--config", str(config), "--port", str(port),
                             "--num_workers", "1"], stdout=log, stderr=subprocess.STDOUT,
                            env=env, start_new_session=True)  # fmt: skip


def guard_latency(world: Settings, calls: int = 20000) -> list[tuple[str, float, float]]:
    """p50/p99 (ms) of one guard decision (hold) against real Redis, with the event id's
    fingerprint checked and recorded and without (an id the proxy made up), interleaved
    call by call so that both see the same machine; and of computing the fingerprint."""
    import redis.asyncio as aioredis
    from psycopg_pool import AsyncConnectionPool

    from llm_proxy.billing import BillingContext
    from llm_proxy.guard import CreditBalanceGuard
    from llm_proxy.wire import call_fingerprint

    async def run() -> dict[bool, list[float]]:
        client = aioredis.Redis.from_url(world.redis_url)
        pool: AsyncConnectionPool[Any] = AsyncConnectionPool(world.postgres_dsn, open=False)
        guard = CreditBalanceGuard(world, client, pool, prefix=PREFIX)
        timings: dict[bool, list[float]] = {True: [], False: []}
        for n in range(calls):
            checked = n % 2 == 0
            user, event = f"bench-u{n % USERS}", f"guard-{os.getpid()}-{n}"
            started = time.perf_counter()
            decision = await guard.hold(user, event, 1000, f"fp-{n}" if checked else None)
            timings[checked].append((time.perf_counter() - started) * 1000)
            await guard.release(user, event, decision.field)
        await client.aclose()
        return timings

    timings = asyncio.run(run())
    body = request_bytes(Target("x", 0, "/", b"", True), False, 7)[1]
    ctx = BillingContext("bench-u7", "chat", "bench-1")
    digests = []
    for _ in range(calls):
        started = time.perf_counter()
        call_fingerprint("/v1/chat/completions", ctx, "chat", body)
        digests.append((time.perf_counter() - started) * 1000)
    return [("guard decision (hold, Lua in Redis), fingerprint checked",
             statistics.median(timings[True]), pct(timings[True], 0.99)),
            ("guard decision, generated id (no fingerprint)",
             statistics.median(timings[False]), pct(timings[False], 0.99)),
            ("fingerprint digest of the request (in process)",
             statistics.median(digests), pct(digests, 0.99))]  # fmt: skip


def io_floor(world: Settings, rate_per_s: float, seconds: float) -> list[tuple[str, float, float]]:
    """What one durable outbox commit and one Redis round trip cost at a given call rate.

    On a VM whose idle vCPUs halt, every wake-up is slower when calls are sparse, so
    these are measured at the benchmark's own rates: the floor under the proxy's added
    latency that no code change in the proxy removes (the commit must be durable before
    the answer ends)."""
    import redis.asyncio as aioredis
    from psycopg_pool import AsyncConnectionPool

    async def run() -> list[tuple[str, float, float]]:
        pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
            world.postgres_dsn, min_size=2, open=False, kwargs={"autocommit": True})  # fmt: skip
        await pool.open(wait=True)
        client = aioredis.Redis.from_url(world.redis_url)
        commits: list[float] = []
        trips: list[float] = []
        stop_at = time.monotonic() + seconds
        n = 0
        while time.monotonic() < stop_at:
            n += 1
            started = time.perf_counter()
            async with pool.connection() as conn:
                await conn.execute(
                    "INSERT INTO outbox (event_id, topic, message_key, message_value, sent_at) "
                    "VALUES (%s, 'floor', 'k', %s, now())",
                    (f"floor-{os.getpid()}-{rate_per_s}-{n}", b"v" * 300))  # fmt: skip
            commits.append((time.perf_counter() - started) * 1000)
            await asyncio.sleep(0.5 / rate_per_s)
            started = time.perf_counter()
            await client.hget(f"{PREFIX}:floor", "x")
            trips.append((time.perf_counter() - started) * 1000)
            await asyncio.sleep(0.5 / rate_per_s)
        async with pool.connection() as conn:
            await conn.execute("DELETE FROM outbox WHERE topic = 'floor'")
        await pool.close()
        await client.aclose()
        return [(f"Postgres INSERT + durable commit at {rate_per_s:.0f}/s",
                 statistics.median(commits), pct(commits, 0.99)),
                (f"Redis round trip at {rate_per_s:.0f}/s",
                 statistics.median(trips), pct(trips, 0.99))]  # fmt: skip

    return asyncio.run(run())


def main() -> int:
    parser = bench_parser(__doc__)
    parser.add_argument("--latency-ms", type=int, default=1000, help="fake upstream latency")
    parser.add_argument("--clients", default="50,200", help="concurrency levels")
    parser.add_argument(
        "--baseline",
        default="",
        metavar="GIT_REF",
        help="also measure the proxy of this commit (e.g. HEAD~3)",
    )
    parser.add_argument(
        "--litellm",
        default=shutil.which("litellm") or "",
        help="path of LiteLLM's `litellm` command ('' = skip LiteLLM)",
    )
    args = parser.parse_args()
    import uvloop

    settings = load_settings()
    workdir = Path(tempfile.mkdtemp(prefix="bench-proxy-"))
    upstream_port, proxy_port, litellm_port, baseline_port = 18180, 18181, 18182, 18183
    world, key, env = prepare_world(settings, workdir, upstream_port, proxy_port)
    processes = ProcessGroup(workdir, env)
    spawn = processes.start
    cli = [sys.executable, "-m", "creditledger.cli"]
    try:
        upstream = spawn("upstream", [*cli, "fake-upstream", "--port", str(upstream_port)])
        wait_up(f"http://127.0.0.1:{upstream_port}/v1/models", upstream)
        proxy = spawn("proxy", [*cli, "proxy", "serve"])
        wait_up(f"http://127.0.0.1:{proxy_port}/healthz", proxy)
        auth = f"Authorization: Bearer {key}\r\n".encode()
        targets = [
            Target("direct", upstream_port, "/v1/chat/completions", b"", False),
            Target("creditledger", proxy_port, "/v1/chat/completions", auth, True),
            Target("generated-id", proxy_port, "/v1/chat/completions", auth, True, False),
        ]  # fmt: skip
        if args.baseline:
            baseline = start_baseline(args.baseline, workdir, env, baseline_port)
            processes.adopt("baseline", baseline)
            wait_up(f"http://127.0.0.1:{baseline_port}/healthz", baseline)
            targets.append(Target("baseline", baseline_port, "/v1/chat/completions", auth, True))
        if args.litellm:
            litellm = start_litellm(args.litellm, workdir, upstream_port, litellm_port)
            processes.adopt("litellm", litellm)
            wait_up(f"http://127.0.0.1:{litellm_port}/health/liveliness", litellm, 180)
            targets.append(Target("litellm", litellm_port, "/v1/chat/completions",
                                  b"Authorization: Bearer sk-bench\r\n", False))  # fmt: skip
        rows: list[tuple[object, ...]] = []
        results: dict[tuple[str, int, bool], tuple[float, float]] = {}
        set_upstream(upstream_port, latency_ms=args.latency_ms, output_tokens=16)
        for stream in (False, True):
            for clients in [int(c) for c in args.clients.split(",")]:
                for target in targets:
                    # Warm up connections and caches, then measure.
                    stagger = args.latency_ms / 1000
                    uvloop.run(closed_loop(target, clients, 2.0, stream, stagger))
                    measured = closed_loop(target, clients, args.seconds + stagger, stream, stagger)
                    latencies, failures = uvloop.run(measured)
                    p50, p99 = statistics.median(latencies), pct(latencies, 0.99)
                    results[(target.name, clients, stream)] = (p50, p99)
                    direct = results[("direct", clients, stream)]
                    added = ("-" if target.name == "direct"
                             else f"{p50 - direct[0]:+.2f} / {p99 - direct[1]:+.2f}")  # fmt: skip
                    rows.append(("streamed" if stream else "non-streamed", clients,
                                 target.name, len(latencies), failures,
                                 f"{len(latencies) / args.seconds:.0f}", f"{p50:.2f}",
                                 f"{p99:.2f}", added))  # fmt: skip
                    print(rows[-1], flush=True)
        print()
        print(f"fake upstream latency {args.latency_ms} ms, 16 output tokens; "
              f"{args.seconds:.0f} s per row (closed loop)")  # fmt: skip
        print(render_table(["call", "clients", "target", "calls", "failed", "calls/s",
                            "p50 ms", "p99 ms", "added p50 / p99 ms"], rows))  # fmt: skip
        if args.litellm:
            print()
            ratio_rows = []
            for stream in (False, True):
                for clients in [int(c) for c in args.clients.split(",")]:
                    d = results[("direct", clients, stream)]
                    ours = results[("creditledger", clients, stream)]
                    theirs = results[("litellm", clients, stream)]
                    ours_added = (ours[0] - d[0], ours[1] - d[1])
                    theirs_added = (theirs[0] - d[0], theirs[1] - d[1])
                    ratio_rows.append((
                        "streamed" if stream else "non-streamed", clients,
                        f"{ours_added[0]:.2f} / {ours_added[1]:.2f}",
                        f"{theirs_added[0]:.2f} / {theirs_added[1]:.2f}",
                        f"{theirs_added[0] / max(ours_added[0], 0.01):.1f}x / "
                        f"{theirs_added[1] / max(ours_added[1], 0.01):.1f}x",
                    ))  # fmt: skip
            print(render_table(["call", "clients", "creditledger added p50/p99 ms",
                                "litellm added p50/p99 ms", "litellm / creditledger"],
                               ratio_rows))  # fmt: skip
        # Max sustained RPS: no upstream latency, enough clients to keep every core busy.
        set_upstream(upstream_port, latency_ms=0)
        print()
        rps_rows = []
        for target in targets:
            uvloop.run(closed_loop(target, 64, 2.0, False))
            latencies, failures = uvloop.run(closed_loop(target, 64, args.seconds, False))
            rps_rows.append((target.name, f"{len(latencies) / args.seconds:.0f}", failures,
                             f"{statistics.median(latencies):.1f}"))  # fmt: skip
        print(
            "max sustained rate, non-streamed, 0 ms upstream, 64 clients "
            "(2 cores shared by load generator, proxy, upstream, Redis, Postgres):"
        )
        print(render_table(["target", "calls/s", "failed", "p50 ms"], rps_rows))
        measures = guard_latency(world)
        for clients in [int(c) for c in args.clients.split(",")]:
            measures += io_floor(world, clients * 1000 / args.latency_ms, min(args.seconds, 5))
        print()
        print(
            render_table(
                ["measure", "p50 ms", "p99 ms"],
                [(name, f"{a:.3f}", f"{b:.3f}") for name, a, b in measures],
            )
        )
    finally:
        processes.stop_all()
        if args.baseline:
            subprocess.run(["git", "worktree", "remove", "--force", str(workdir / "baseline")],
                           check=False, capture_output=True)  # fmt: skip
        print(f"logs: {workdir}")
    return 0


def start_baseline(ref: str, workdir: Path, env: dict[str, str],
                   port: int) -> subprocess.Popen[bytes]:  # fmt: skip
    """The proxy of commit ``ref``, from a git worktree, on ``port``: the same config and
    Redis, but a database of its own, migrated by that commit's code (a proxy refuses a
    database with migrations it does not know)."""
    tree = workdir / "baseline"
    subprocess.run(["git", "worktree", "add", "--detach", str(tree), ref], check=True,
                   capture_output=True)  # fmt: skip
    dsn = env["CREDITLEDGER_POSTGRES__URL"] + "_baseline"
    with connect(load_settings(), autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {DATABASE}_baseline WITH (FORCE)".encode())
        conn.execute(f"CREATE DATABASE {DATABASE}_baseline".encode())
    baseline_env = {**env, "PYTHONPATH": str(tree), "CREDITLEDGER_PROXY__PORT": str(port),
                    "CREDITLEDGER_POSTGRES__URL": dsn}  # fmt: skip
    log = (workdir / "baseline.log").open("ab")
    cli = [sys.executable, "-m", "creditledger.cli"]
    subprocess.run([*cli, "migrate"], cwd=tree, env=baseline_env, stdout=log,
                   stderr=subprocess.STDOUT, check=True)  # fmt: skip
    return subprocess.Popen([*cli, "proxy", "serve"], cwd=tree, env=baseline_env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
