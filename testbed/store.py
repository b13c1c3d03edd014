"""A credit-store world: a proxy world's database, Redis prefix and configuration (the
store reads the price rules file and the ledger's read models) without its fake upstream,
plus a real ``creditledger store serve`` process on the same database.

Requests go over real HTTP with urllib, so the tests see exactly what a browser
or another service would, and the store process can be SIGKILLed.
"""

from __future__ import annotations

import contextlib
import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

from contracts.commands import Grant
from contracts.records import GRANT_TOPIC, command_from_record
from contracts.tokens import Role, sign_token
from kernel.db import connect
from kernel.settings import Settings, project_path
from store.domain import sign_payment
from streams.codec import AvroCodec, load_codec
from testbed.proxy import ProxyWorld, free_port, wait_http
from testbed.topics import ScratchTopics

TOKEN_SECRET = "test-token-secret"
PAYMENT_SECRET = "test-payment-secret"


class StoreWorld(ProxyWorld):
    def __init__(self, stack_settings: Settings, scratch: ScratchTopics, unique: str,
                 codec: AvroCodec, **kwargs: Any) -> None:  # fmt: skip
        kwargs.setdefault("upstream", False)  # the store calls no model
        super().__init__(stack_settings, scratch, unique, codec, **kwargs)
        self.store_port = free_port()
        self.store_url = f"http://127.0.0.1:{self.store_port}/credit-store"
        self.extra_env.update({
            "CREDITLEDGER_STORE__TOKEN_SECRET": TOKEN_SECRET,
            "CREDITLEDGER_STORE__PAYMENT_SECRET": PAYMENT_SECRET,
            "CREDITLEDGER_STORE__FULFIL_INTERVAL_S": "0.2",
            "CREDITLEDGER_STORE__SIMULATED_PROVIDER": "true",  # loopback only, tests only
        })  # fmt: skip

    def start_store(self, name: str = "store", port: int | None = None,
                    **settings: str) -> str:  # fmt: skip
        """Start a store process (settings as ``store.<name>=value``); its base URL."""
        for key, value in settings.items():
            self.extra_env[f"CREDITLEDGER_STORE__{key.upper()}"] = value
        port = port or self.store_port
        url = f"http://127.0.0.1:{port}/credit-store"
        process = self.start_process(name, "store", "serve", "--port", str(port))
        wait_http(f"{url}/openapi.json", process, self.logdir / f"{name}.log")
        self.seed()
        return url

    def seed(self) -> None:
        from store.seed import seed

        seed(self.env_settings(), dsn=self.dsn)

    def token(self, user: str, role: Role = "user", ttl_s: int = 600) -> str:
        return sign_token(TOKEN_SECRET.encode(), user, role, int(time.time()) + ttl_s)

    def raw(self, method: str, path: str, *, token: str | None = None, body: Any = None,
            headers: dict[str, str] | None = None, base: str | None = None,
            timeout: float = 30) -> tuple[int, str, bytes]:  # fmt: skip
        """Status, content type and body bytes of one request (to ``base``, default the
        store started first)."""
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request((base or self.store_url) + path, data=data,
                                         method=method)  # fmt: skip
        request.add_header("Content-Type", "application/json")
        if token is not None:
            request.add_header("Authorization", f"Bearer {token}")
        for name, value in (headers or {}).items():
            request.add_header(name, value)
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return response.status, response.headers.get("content-type", ""), response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.headers.get("content-type", ""), exc.read()

    def call(self, method: str, path: str, *, token: str | None = None, body: Any = None,
             headers: dict[str, str] | None = None,
             timeout: float = 30) -> tuple[int, Any]:  # fmt: skip
        status, _, raw = self.raw(method, path, token=token, body=body, headers=headers,
                                  timeout=timeout)  # fmt: skip
        try:
            return status, json.loads(raw or b"null")
        except ValueError:
            return status, raw.decode(errors="replace")

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


@contextlib.contextmanager
def store_world(stack_settings: Settings, scratch: ScratchTopics, unique: str, *,
                start: bool = True, **kwargs: Any) -> Iterator[StoreWorld]:  # fmt: skip
    """A test's store world (the store process started unless ``start`` is false), cleaned
    up afterwards whatever happens."""
    codec = load_codec(project_path(stack_settings.schemas.avro_dir))
    world = StoreWorld(stack_settings, scratch, unique, codec, **kwargs)
    try:
        if start:
            world.start_store()
        yield world
    finally:
        world.cleanup()
