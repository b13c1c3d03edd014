"""Step 6 of the demo: real traffic through the LLM proxy, all the way to the read models.

Starts a fake upstream, a ledger worker, the outbox relay, both projectors and
the proxy (each its own process, as in production), grants credits to a few
demo users, sends a burst of calls with the official ``openai`` SDK (streamed
and not, embeddings, a retried event id, a user who runs out of credit), and
prints what Redis and Postgres say afterwards next to what the calls were
priced at.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import openai
import yaml

from contracts.cloudevents import command_headers
from contracts.commands import Grant
from contracts.records import GRANT_TOPIC, command_to_record
from creditledger.plaza_demo import plaza_demo, start_plaza
from creditledger.store_demo import start_store, store_demo
from creditledger.tables import render_table
from kernel.settings import Settings, project_path
from llm_proxy.auth import new_key
from pricing.rules import TokenUsage
from pricing.source import merge, read_yaml
from stack.processes import wait_http
from streams.codec import AvroCodec
from streams.kafka_clients import make_producer

UPSTREAM_PORT = 18080
CALLS = 240
CONCURRENCY = 24
GRANTS = {"ada": 2_000_000, "grace": 2_000_000, "linus": 2_000_000, "edsger": 1_000_000,
          "broke": 300}  # fmt: skip


@dataclass
class UserTally:
    ok: int = 0
    refused: int = 0
    priced_micro: int = 0
    event_ids: set[str] = field(default_factory=set)


def _spawn(settings: Settings, name: str, args: list[str],
           env: dict[str, str]) -> subprocess.Popen[bytes]:  # fmt: skip
    log = (settings.stack.state_dir / f"demo-{name}.log").open("ab")
    command = [sys.executable, "-m", "creditledger.cli", *args]
    return subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)  # fmt: skip


def _config(settings: Settings, key_hash: str) -> Path:
    upstream = f"http://127.0.0.1:{UPSTREAM_PORT}/v1"
    config = {"proxy": {
        "models": [
            {"alias": "demo-chat", "upstream_base_url": upstream, "upstream_model": "fake-small",
             "price_rule": "demo-chat"},
            {"alias": "demo-embed", "upstream_base_url": upstream,
             "upstream_model": "fake-embed", "price_rule": "demo-embed"},
        ],
        "services": [{"name": "demo-app", "key_sha256": key_hash, "scenes": ["chat", "search"]}],
    }}  # fmt: skip
    path = settings.stack.state_dir / "demo-proxy.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _grant(settings: Settings, codec: AvroCodec, users: dict[str, str], run: str) -> None:
    producer = make_producer(settings)
    now = int(time.time() * 1000)
    for name, user in users.items():
        grant = Grant(f"{run}-grant-{name}", user, "purchase", GRANTS[name], f"order-{run}-{name}",
                      None, now, "demo")  # fmt: skip
        producer.produce(GRANT_TOPIC, key=user.encode(), headers=command_headers(grant),
                         value=codec.encode(GRANT_TOPIC, command_to_record(grant)))  # fmt: skip
    producer.flush(30)


async def _burst(base_url: str, key: str, users: dict[str, str], run: str,
                 settings: Settings) -> dict[str, UserTally]:  # fmt: skip
    """CALLS calls from CONCURRENCY clients; each success is priced here, independently of
    the proxy, from the usage the answer reports and the rule in price_rules.yaml."""
    book = merge(read_yaml(project_path(settings.proxy.price_rules_file)), [])
    now = int(time.time() * 1000)
    chat_rule, embed_rule = book.active("demo-chat", now), book.active("demo-embed", now)
    client = openai.AsyncOpenAI(base_url=base_url, api_key=key, max_retries=0)
    tally = {name: UserTally() for name in users}
    names = list(users)
    queue: asyncio.Queue[int] = asyncio.Queue()
    for n in range(CALLS):
        queue.put_nowait(n)

    async def one(n: int) -> None:
        name = names[n % len(names)]
        event_id = f"{run}-call-{n}"
        headers = {"X-Billing-User-Id": users[name], "X-Billing-Scene": "chat",
                   "X-Billing-Event-Id": event_id, "X-Request-Id": f"req-{run}-{n}"}  # fmt: skip
        messages: Any = [{"role": "user", "content": f"demo question number {n}, answer briefly"}]
        try:
            if n % 10 == 3:
                headers["X-Billing-Scene"] = "search"
                answer = await client.embeddings.create(model="demo-embed", input=f"doc {n}",
                                                        extra_headers=headers)  # fmt: skip
                usage = TokenUsage(answer.usage.prompt_tokens, 0)
                price = embed_rule.price(usage)
            elif n % 2:
                stream = await client.chat.completions.create(
                    model="demo-chat", messages=messages, stream=True, extra_headers=headers,
                    stream_options={"include_usage": True})  # fmt: skip
                last = None
                async for chunk in stream:
                    last = chunk
                assert last is not None and last.usage is not None
                price = chat_rule.price(TokenUsage(last.usage.prompt_tokens,
                                                   last.usage.completion_tokens))  # fmt: skip
            else:
                reply = await client.chat.completions.create(
                    model="demo-chat", messages=messages, extra_headers=headers)  # fmt: skip
                assert reply.usage is not None
                price = chat_rule.price(TokenUsage(reply.usage.prompt_tokens,
                                                   reply.usage.completion_tokens))  # fmt: skip
        except openai.APIStatusError as exc:
            if exc.status_code != 402:
                raise
            tally[name].refused += 1
            return
        tally[name].ok += 1
        if event_id not in tally[name].event_ids:
            tally[name].event_ids.add(event_id)
            tally[name].priced_micro += price

    async def worker() -> None:
        while not queue.empty():
            n = queue.get_nowait()
            await one(n)
            if n % 20 == 19:
                await one(n)  # a client retrying the same call (same event id): charged once

    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    await client.close()
    return tally


def proxy_demo(settings: Settings, codec: AvroCodec, run: str) -> bool:
    import asyncio as aio

    print("== 6. the LLM proxy: real calls through the openai SDK, charged through the outbox")
    key, key_hash = new_key()
    env = {**os.environ, "CREDITLEDGER_CONFIG": str(_config(settings, key_hash))}
    processes: dict[str, subprocess.Popen[bytes]] = {}
    users = {name: f"demo-{run}-{name}" for name in GRANTS}
    try:
        processes["upstream"] = _spawn(settings, "upstream", [
            "fake-upstream", "--port", str(UPSTREAM_PORT), "--latency-ms", "20",
            "--chunk-delay-ms", "1"], env)  # fmt: skip
        processes["worker"] = _spawn(settings, "worker", ["worker", "--name", "demo"], env)
        processes["relay"] = _spawn(settings, "relay", ["outbox", "relay"], env)
        for sink in ("redis", "postgres"):
            processes[sink] = _spawn(settings, f"project-{sink}", ["project", sink], env)
        processes["proxy"] = _spawn(settings, "proxy", ["proxy", "serve"], env)
        base = f"http://{settings.proxy.host}:{settings.proxy.port}"
        upstream_url = f"http://127.0.0.1:{UPSTREAM_PORT}/v1/models"
        if not (wait_http(upstream_url, processes["upstream"], 60)
                and wait_http(f"{base}/healthz", processes["proxy"], 60)):  # fmt: skip
            print(f"proxy or fake upstream did not start; see {settings.stack.state_dir}")
            return False
        _grant(settings, codec, users, run)
        print(f"granted {sum(GRANTS.values())} µcr to {len(users)} users; waiting for the "
              "ledger and the Redis projection ...")  # fmt: skip
        if not _wait_balances(settings, users, {n: GRANTS[n] for n in users}):
            print("the grants did not reach Redis in time")
            return False
        t0 = time.monotonic()
        tally = aio.run(_burst(f"{base}/v1", key, users, run, settings))
        took = time.monotonic() - t0
        done = sum(t.ok + t.refused for t in tally.values())
        print(f"{done} calls ({CONCURRENCY} concurrent clients) in {took:.1f} s "
              f"= {done / took:.0f} calls/s, through proxy -> fake upstream")  # fmt: skip
        expected = {n: GRANTS[n] - tally[n].priced_micro for n in users}
        settled = _wait_balances(settings, users, expected)
        rows, same = _summary(settings, users, tally, expected)
        print(render_table(["user", "granted", "calls ok", "402", "priced µcr", "expected",
                            "redis", "postgres", "24h calls", "24h tokens in/out", "match"],
                           rows))  # fmt: skip
        print(_metrics_excerpt(base))
        ok = settled and same and tally["broke"].refused > 0
        print(
            f"proxy demo: {'every charge arrived once' if ok else 'MISMATCH'} "
            "(balances = grants - prices computed from the answers' usage)"
        )
        if not ok:
            print("failed: step 6 (proxy)")
        return _store_and_plaza(settings, env, processes, users, run) and ok
    finally:
        for process in processes.values():
            if process.poll() is None:
                process.terminate()
        for process in processes.values():
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()


def _store_and_plaza(settings: Settings, env: dict[str, str],
                     processes: dict[str, subprocess.Popen[bytes]], users: dict[str, str],
                     run: str) -> bool:  # fmt: skip
    """Steps 7 and 8, while the worker, relay and projectors of step 6 still run."""
    keep = os.environ.get("CREDITLEDGER_DEMO_KEEP_STORE", "1") != "0"
    store, plaza = start_store(settings, env, keep), start_plaza(settings, env, keep)
    if not keep:
        processes.update(store=store, plaza=plaza)
    store_ok = store_demo(settings, store, users["ada"])
    processes["rewards"] = _spawn(settings, "event-rewards", ["store", "event-rewards"], env)
    plaza_ok = plaza_demo(settings, plaza, users["grace"], users["linus"], run)
    if not (store_ok and plaza_ok):
        steps = [name for name, good in (("7 (store)", store_ok), ("8 (plaza)", plaza_ok))
                 if not good]  # fmt: skip
        print(f"\nfailed: step {', '.join(steps)}")
    ok = store_ok and plaza_ok
    kept = [p for p in (store, plaza) if keep and p.poll() is None]
    if kept:
        pids = " ".join(str(p.pid) for p in kept)
        print(
            f"the store and the plaza keep running (stop them with: kill {pids}); to buy "
            "or import from the pages, also run `creditledger worker`, `creditledger outbox "
            "relay`, `creditledger project redis` and `creditledger store event-rewards`"
        )
    return ok


def _wait_balances(settings: Settings, users: dict[str, str], expected: dict[str, int],
                   timeout: float = 300) -> bool:  # fmt: skip
    from contracts.redis_keys import balance_key
    from kernel.redis import connect_redis

    client = connect_redis(settings)
    prefix = settings.projections.redis_key_prefix
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            found = {n: client.hget(balance_key(prefix, u), "balance_micro")
                     for n, u in users.items()}  # fmt: skip
            if all(v is not None and int(v) == expected[n] for n, v in found.items()):
                return True
            time.sleep(0.3)
        return False
    finally:
        client.close()


def _summary(settings: Settings, users: dict[str, str], tally: dict[str, UserTally],
             expected: dict[str, int]) -> tuple[list[tuple[object, ...]], bool]:  # fmt: skip
    from projections.queries import ReadModels

    async def read() -> list[tuple[object, ...]]:
        models = ReadModels(settings)
        await models.start()
        rows: list[tuple[object, ...]] = []
        try:
            for name, user in users.items():
                redis_balance = (await models.redis_balance(user)).balance_micro
                pg = (await models.postgres_balance(user)).balance_micro
                usage = (await models.consumption(user, "24h")).total
                match = redis_balance == pg == expected[name]
                rows.append((user, GRANTS[name], tally[name].ok, tally[name].refused,
                             tally[name].priced_micro, expected[name], redis_balance, pg,
                             usage.calls, f"{usage.input_tokens}/{usage.output_tokens}",
                             "yes" if match else "NO"))  # fmt: skip
        finally:
            await models.close()
        return rows

    rows = asyncio.run(read())
    return rows, all(row[-1] == "yes" for row in rows)


def _metrics_excerpt(base: str) -> str:
    with urllib.request.urlopen(f"{base}/metrics", timeout=5) as response:
        text = response.read().decode()
    wanted = ("llm_proxy_requests_total", "llm_proxy_charges_total",
              "llm_proxy_guard_refusals_total")  # fmt: skip
    lines = [line for line in text.splitlines() if line.startswith(wanted)]
    return "proxy /metrics (excerpt):\n  " + "\n  ".join(lines)
