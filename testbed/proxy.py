"""A proxy world: a :class:`~testbed.world.World` with the proxy's configuration (models,
price rules, service keys), a fake upstream and a real proxy, started on demand.

The proxy runs as a real process (``creditledger proxy serve``) configured by
a YAML file written here, so tests talk to it through the official ``openai``
SDK exactly as a service would, and can SIGKILL it.
"""

from __future__ import annotations

import json
import random
import socket
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import openai
import redis
import yaml

from contracts.commands import Charge
from contracts.records import CHARGE_TOPIC, command_from_record
from contracts.redis_keys import balance_key, holds_key
from kernel.db import connect
from kernel.settings import Settings
from llm_proxy.auth import new_key
from llm_proxy.fake_upstream import set_behaviour
from stack import processes
from streams.codec import AvroCodec
from testbed.topics import ScratchTopics
from testbed.world import World

# Prices of the test rule: 10 micro-credits per input token, 20 per output token.
PRICE_RULES = [{"id": "test-chat", "versions": [{
    "version": 1, "effective_from": "2026-01-01T00:00:00Z", "input": 10, "cached_input": 5,
    "output": 20, "reasoning": 30, "minimum": 1,
}]}, {"id": "test-embed", "versions": [{
    "version": 1, "effective_from": "2026-01-01T00:00:00Z", "input": 2, "output": 0,
}]}]  # fmt: skip


_handed_out: set[int] = set()


def free_port() -> int:
    """A free port below the kernel's ephemeral range (32768+), so no outgoing connection
    can take it between now and the server's bind, and never the same one twice."""
    while True:
        port = random.randint(20000, 31999)
        if port in _handed_out:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port


def wait_http(url: str, process: subprocess.Popen[bytes], log: Path, timeout: float = 60) -> None:
    if not processes.wait_http(url, process, timeout):
        state = "died" if process.poll() is not None else f"not up after {timeout} s"
        raise AssertionError(f"{url} {state}:\n{log.read_text(errors='replace')[-3000:]}")


def wait_for(what: str, check: object, timeout: float, world: World, *,
             poll_s: float = 0.1) -> None:  # fmt: skip
    """Poll ``check`` every ``poll_s`` until true; on timeout fail with the world's logs."""
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached in {timeout} s\n{world.log_tail(lines=40)}")
        time.sleep(poll_s)


class ProxyWorld(World):
    """``upstream``: start the fake upstream now (a store world needs none)."""

    def __init__(self, stack_settings: Settings, scratch: ScratchTopics, unique: str,
                 codec: AvroCodec, *, output_tokens: int = 5,
                 ledger_topic: str | None = None,
                 proxy_settings: dict[str, Any] | None = None,
                 chat_alias: dict[str, Any] | None = None,
                 upstream: bool = True) -> None:  # fmt: skip
        super().__init__(stack_settings, scratch, unique, codec)
        self.key, key_hash = new_key()
        self.ops_key, ops_hash = new_key()
        self.upstream_port = free_port()
        self.port = free_port()
        self.upstream = f"http://127.0.0.1:{self.upstream_port}"
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self.spool_dir = self.logdir / "spool"
        self.output_tokens = output_tokens
        self._write_config(key_hash, ops_hash, proxy_settings, chat_alias)
        if ledger_topic:
            self.extra_env["CREDITLEDGER_PROJECTIONS__LEDGER_TOPIC"] = ledger_topic
        if upstream:
            try:
                self.start_upstream()
            except BaseException:
                self.cleanup()  # no process or database outlives a failed set-up
                raise

    def _write_config(self, key_hash: str, ops_hash: str, proxy_settings: dict[str, Any] | None,
                      chat_alias: dict[str, Any] | None) -> None:  # fmt: skip
        rules = self.logdir / "price_rules.yaml"
        rules.write_text(yaml.safe_dump({"price_rules": PRICE_RULES}))
        model = {"upstream_base_url": f"{self.upstream}/v1", "price_rule": "test-chat",
                 "upstream_api_key_env": ""}  # fmt: skip
        config = {"proxy": {
            "port": self.port, "price_rules_file": str(rules), "price_rules_refresh_s": 0.5,
            "spool_dir": str(self.spool_dir), "upstream_max_retries": 0,
            "direct_produce_timeout_s": 3.0, "hold_output_tokens": 10,
            "models": [
                {**model, "alias": "chat", "upstream_model": "fake-small", **(chat_alias or {})},
                {**model, "alias": "embed", "upstream_model": "fake-embed",
                 "price_rule": "test-embed"},
            ],
            "services": [
                {"name": "billing", "key_sha256": key_hash, "scenes": ["chat", "search"]},
                {"name": "ops", "key_sha256": ops_hash, "scenes": ["*"], "may_skip_charge": True},
            ],
        }}  # fmt: skip
        config["proxy"].update(proxy_settings or {})
        self.config = self.logdir / "config.yaml"
        self.config.write_text(yaml.safe_dump(config))
        self.extra_env["CREDITLEDGER_CONFIG"] = str(self.config)

    # -- parts -----------------------------------------------------------------------------

    def start_process(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        return self.start(name, *args)

    def start_upstream(self) -> None:
        process = self.start("upstream", "fake-upstream", "--port", str(self.upstream_port),
                             "--output-tokens", str(self.output_tokens))  # fmt: skip
        wait_http(f"{self.upstream}/_fake/behaviour", process, self.parts.log("upstream"))

    def start_proxy(self) -> None:
        process = self.start("proxy", "proxy", "serve")
        wait_http(f"http://127.0.0.1:{self.port}/healthz", process, self.parts.log("proxy"))

    # -- clients ---------------------------------------------------------------------------

    def client(self, user: str | None = None, scene: str | None = "chat", *,
               key: str | None = None, **headers: str) -> openai.OpenAI:  # fmt: skip
        default = dict(headers)
        if user is not None:
            default["X-Billing-User-Id"] = user
        if scene is not None:
            default["X-Billing-Scene"] = scene
        return openai.OpenAI(base_url=self.base_url, api_key=key or self.key, max_retries=0,
                             default_headers=default, timeout=30)  # fmt: skip

    def behave(self, **fields: object) -> None:
        set_behaviour(self.upstream, **fields)

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=5) as r:
            text: str = r.read().decode()
            return text

    # -- state -----------------------------------------------------------------------------

    def set_balance(self, user: str, balance_micro: int, seq: int = 1) -> None:
        """Write the user's snapshot as the Redis projector would (tests of the guard alone)."""
        client = redis.Redis.from_url(self.settings.redis_url)
        snapshot = {"balance_micro": balance_micro, "seq": seq, "updated_at_ms": 0}
        client.hset(balance_key(self.prefix, user), mapping=snapshot)  # type: ignore[arg-type]
        client.close()

    def holds(self, user: str) -> dict[str, str]:
        client = redis.Redis.from_url(self.settings.redis_url, decode_responses=True)
        try:
            found: dict[str, str] = client.hgetall(holds_key(self.prefix, user))  # type: ignore[assignment]
            return found
        finally:
            client.close()

    def redis(self) -> redis.Redis:
        return redis.Redis.from_url(self.settings.redis_url, decode_responses=True)

    def upstream_calls(self) -> int:
        """How many calls the fake upstream has answered (or begun answering)."""
        with urllib.request.urlopen(f"{self.upstream}/_fake/behaviour", timeout=5) as r:
            return int(json.loads(r.read())["calls"])

    def outbox_charges(self) -> list[Charge]:
        with connect(self.settings) as conn:
            rows = conn.execute("SELECT topic, message_value FROM outbox ORDER BY id").fetchall()
        charges = []
        for topic, value in rows:
            assert topic == CHARGE_TOPIC
            decoded = self.codec.decode(bytes(value))
            command = command_from_record(decoded.event_type, decoded.record)
            assert isinstance(command, Charge)
            charges.append(command)
        return charges

    def env_settings(self) -> Settings:
        return self.settings
