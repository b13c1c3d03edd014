"""A credit-store world per test: a proxy world (own database, Redis prefix, fake upstream)
plus a real ``creditledger store serve`` process on the same database.

Requests go over real HTTP with urllib, so the tests see exactly what a browser
or another service would, and the store process can be SIGKILLed.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from typing import Any

from agents.domain import Grant
from agents.records import GRANT_TOPIC, command_from_record
from creditledger.settings import Settings
from projections.db import connect
from store.domain import Role, sign_payment, sign_token
from streams.codec import AvroCodec
from tests.integration.conftest import ScratchTopics
from tests.integration.proxy_harness import ProxyWorld, free_port, wait_http

TOKEN_SECRET = "test-token-secret"
PAYMENT_SECRET = "test-payment-secret"


def wait_for(what: str, check: object, timeout: float, world: ProxyWorld) -> None:
    """Poll ``check`` until true; on timeout fail with the world's process logs."""
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        if time.monotonic() > deadline:
            logs = "\n".join(f"--- {n}\n{world.log_tail(n)}" for n in world.processes)
            raise AssertionError(f"{what} not reached in {timeout} s\n{logs}")
        time.sleep(0.1)


class StoreWorld(ProxyWorld):
    def __init__(self, stack_settings: Settings, scratch: ScratchTopics, unique: str,
                 codec: AvroCodec, **kwargs: Any) -> None:  # fmt: skip
        super().__init__(stack_settings, scratch, unique, codec, **kwargs)
        self.store_port = free_port()
        self.store_url = f"http://127.0.0.1:{self.store_port}/credit-store"
        self.extra_env.update({
            "CREDITLEDGER_STORE__TOKEN_SECRET": TOKEN_SECRET,
            "CREDITLEDGER_STORE__PAYMENT_SECRET": PAYMENT_SECRET,
            "CREDITLEDGER_STORE__FULFIL_INTERVAL_S": "0.2",
        })  # fmt: skip

    def start_store(self, **settings: str) -> None:
        for name, value in settings.items():
            self.extra_env[f"CREDITLEDGER_STORE__{name.upper()}"] = value
        process = self.start_process("store", "store", "serve", "--port", str(self.store_port))
        wait_http(f"{self.store_url}/openapi.json", process, self.logdir / "store.log")
        self.seed()

    def seed(self) -> None:
        from store.seed import seed

        seed(self.env_settings(), dsn=self.dsn)

    def token(self, user: str, role: Role = "user", ttl_s: int = 600) -> str:
        return sign_token(TOKEN_SECRET.encode(), user, role, int(time.time()) + ttl_s)

    def call(self, method: str, path: str, *, token: str | None = None, body: Any = None,
             headers: dict[str, str] | None = None,
             timeout: float = 30) -> tuple[int, Any]:  # fmt: skip
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.store_url + path, data=data, method=method)
        request.add_header("Content-Type", "application/json")
        if token is not None:
            request.add_header("Authorization", f"Bearer {token}")
        for name, value in (headers or {}).items():
            request.add_header(name, value)
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return response.status, json.loads(response.read() or b"null")
        except urllib.error.HTTPError as exc:
            raw = exc.read()
            try:
                return exc.code, json.loads(raw or b"null")
            except ValueError:
                return exc.code, raw.decode(errors="replace")

    def pay(self, order: dict[str, Any], reference: str, *, amount_minor: int | None = None,
            signature: str | None = None) -> tuple[int, Any]:  # fmt: skip
        amount = order["price_minor"] if amount_minor is None else amount_minor
        body = {"payment_reference": reference, "amount_minor": amount,
                "currency": order["currency"]}  # fmt: skip
        sig = signature or sign_payment(PAYMENT_SECRET.encode(), order["order_id"], reference,
                                        amount, order["currency"])  # fmt: skip
        return self.call("POST", f"/orders/{order['order_id']}/pay", body=body,
                         headers={"X-Payment-Signature": sig})  # fmt: skip

    def outbox_grants(self) -> list[Grant]:
        with connect(self.env_settings()) as conn:
            rows = conn.execute("SELECT message_value FROM outbox WHERE topic = %s ORDER BY id",
                                (GRANT_TOPIC,)).fetchall()  # fmt: skip
        grants = []
        for (value,) in rows:
            decoded = self.codec.decode(bytes(value))
            command = command_from_record(decoded.event_type, decoded.record)
            assert isinstance(command, Grant)
            grants.append(command)
        return grants

    def order_status(self, order_id: str) -> str | None:
        with connect(self.env_settings()) as conn:
            row = conn.execute("SELECT status FROM orders WHERE order_id = %s",
                               (order_id,)).fetchone()  # fmt: skip
        return None if row is None else str(row[0])
