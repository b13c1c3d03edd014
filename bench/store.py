"""The credit-store API under load: GET balance, consumption (30d) and ledger.

    ./dev bench store [--seconds 10] [--clients 100] [--workers 1,2] [--load wrk] [--quick]

Data: 10M ledger entries over 100k users in the database ``bench_queries``
(made by ``bench.projections`` and kept between runs; the first run generates
it, a few minutes), plus a Redis balance snapshot per user under a prefix of
its own. A real ``creditledger store serve`` process answers; 100 clients
(closed loop, keep-alive, each request for a random user with that user's
signed token) hit one endpoint at a time, then all three mixed. ``--workers 1,2``
measures the store with 1, then 2 server processes. The CPU columns say who used the
two cores (% of one core). The load comes from ``wrk`` when it is installed
(``./dev bench`` installs it: a standard tool, independent of this code), else from
the Python client of ``bench.common``; ``--load`` picks one. Both measured the same
p99 here (see ARCHITECTURE.md). ``--quick``
uses 200k entries over 2k users (and regenerates ``bench_queries`` at that
size). Needs the stack up.
"""

from __future__ import annotations

import os
import random
import sys
import tempfile
import time
from pathlib import Path

from bench.common import CpuMeter, bench_parser, http_load, load_tool
from bench.projections import ensure_query_data
from contracts.redis_keys import balance_key
from contracts.tokens import sign_token
from creditledger.tables import render_table
from kernel.db import connect
from kernel.settings import load_settings
from stack.processes import ProcessGroup, wait_http

PREFIX = "bench-store"
SECRET = "bench-store-secret"
PORT = 18192

ENDPOINTS = {
    "balance": "/credit-store/balance",
    "consumption 30d": "/credit-store/consumption?period=30d",
    "ledger (first page)": "/credit-store/ledger?limit=20",
}


def seed_redis(settings_url: str, rows: list[tuple[str, int, int]]) -> None:
    import redis

    client = redis.Redis.from_url(settings_url)
    for key in client.scan_iter(match=f"{PREFIX}:*", count=5000):
        client.delete(key)
    pipe = client.pipeline(transaction=False)
    for n, (user, balance, seq) in enumerate(rows, 1):
        pipe.hset(balance_key(PREFIX, user),
                  mapping={"balance_micro": balance, "seq": seq, "updated_at_ms": 0})  # fmt: skip
        if n % 5000 == 0:
            pipe.execute()
    pipe.execute()
    client.close()


def main() -> int:
    parser = bench_parser(__doc__)
    parser.add_argument("--clients", type=int, default=100, help="concurrent clients")
    parser.add_argument("--quick", action="store_true", help="200k entries over 2k users")
    parser.add_argument("--workers", default="1",
                        help="store server processes; a list (1,2) measures each")  # fmt: skip
    parser.add_argument("--load", choices=("auto", "wrk", "python"), default="auto",
                        help="load generator (auto: wrk when installed, else python)")  # fmt: skip
    args = parser.parse_args()
    tool = load_tool(parser, args.load)
    entries, users = (200_000, 2_000) if args.quick else (10_000_000, 100_000)
    base = load_settings()
    settings = ensure_query_data(base, entries, users, rebuild=False)
    with connect(settings) as conn:
        rows = conn.execute("SELECT user_id, balance_micro, seq FROM accounts").fetchall()
    seed_redis(base.redis_url, [(u, int(b), int(s)) for u, b, s in rows])
    user_ids = [str(r[0]) for r in rows]
    expires = int(time.time()) + 3600
    tokens = [sign_token(SECRET.encode(), u, "user", expires).encode()
              for u in random.sample(user_ids, min(len(user_ids), 5000))]  # fmt: skip
    env = {**os.environ, "CREDITLEDGER_POSTGRES__URL": settings.postgres_dsn,
           "CREDITLEDGER_PROJECTIONS__REDIS_KEY_PREFIX": PREFIX,
           "CREDITLEDGER_STORE__TOKEN_SECRET": SECRET}  # fmt: skip
    env.pop("DATABASE_URL", None)
    table = []
    for workers in [int(w) for w in args.workers.split(",")]:
        table += measure(env, workers, tokens, args.clients, args.seconds, tool)
    print()
    print(f"{entries:,} entries over {len(user_ids):,} users; {args.clients} clients (closed "
          f"loop, keep-alive, load from {tool}), {args.seconds:.0f} s per row; "
          f"{os.cpu_count()} cores shared by the store, Postgres, Redis and the load "
          "generator; CPU in % of one core")  # fmt: skip
    print(render_table(["endpoint", "workers", "requests", "failed", "req/s", "p50 ms",
                        "p99 ms", "max ms", "CPU store", "CPU pg", "CPU load"], table))  # fmt: skip
    return 0


def measure(env: dict[str, str], workers: int, tokens: list[bytes], clients: int,
            seconds: float, tool: str) -> list[tuple[object, ...]]:  # fmt: skip
    processes = ProcessGroup(Path(tempfile.mkdtemp(prefix="bench-store-")), env)
    command = [sys.executable, "-m", "creditledger.cli", "store", "serve", "--port", str(PORT),
               "--workers", str(workers)]  # fmt: skip
    process = processes.start("store", command)
    rows: list[tuple[object, ...]] = []
    try:
        if not wait_http(f"http://127.0.0.1:{PORT}/credit-store/openapi.json", process, 60):
            raise SystemExit(f"the store did not come up; see {processes.log('store')}")
        runs = [(name, [path]) for name, path in ENDPOINTS.items()]
        runs.append(("all three, mixed", list(ENDPOINTS.values())))
        meter = CpuMeter(process.pid)
        for name, paths in runs:
            http_load(tool, PORT, paths, tokens, clients, 2.0)  # warm up
            meter.start()
            result = http_load(tool, PORT, paths, tokens, clients, seconds)
            cpu = meter.stop(seconds)
            rows.append((name, workers, result.ok, result.failed, f"{result.ok / seconds:.0f}",
                         f"{result.p50_ms:.1f}", f"{result.p99_ms:.1f}", f"{result.max_ms:.1f}",
                         f"{cpu['server']:.0f}", f"{cpu['postgres']:.0f}",
                         f"{cpu['load generator']:.0f}"))  # fmt: skip
            print(rows[-1], flush=True)
    finally:
        processes.stop_all()
    return rows


if __name__ == "__main__":
    sys.exit(main())
