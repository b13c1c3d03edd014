"""Step 7 of the demo: the credit store, with a buy -> grant -> balance round trip.

Runs inside the proxy step while its ledger worker, relay and projectors are up:
starts ``creditledger store serve``, adds the starting packs and reward rules,
buys the starter pack for a demo user through the simulated payment provider,
and times the order until the new balance is visible in the API. The store is
left running (unless ``CREDITLEDGER_DEMO_KEEP_STORE=0``), so the printed page
URL and token open the page afterwards.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from contracts.tokens import sign_token
from creditledger.tables import render_table
from kernel.settings import Settings
from stack.processes import wait_http
from store.seed import seed


def call_json(base: str, method: str, path: str, token: str, body: Any = None) -> Any:
    """One JSON call with a bearer token; an HTTP error raises (the demo stops on it)."""
    headers = {"Authorization": f"Bearer {token}"}
    data = None if method in ("GET", "HEAD") else b""
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    request = urllib.request.Request(base + path, method=method, data=data, headers=headers)
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def user_token(settings: Settings, user: str) -> str:
    """A user's bearer token for the store and the plaza, signed with the store's secret."""
    secret = settings.store.token_secret.get_secret_value().encode()
    return sign_token(secret, user, "user", int(time.time()) + settings.store.token_ttl_s)


def start_store(settings: Settings, env: dict[str, str], keep: bool) -> subprocess.Popen[bytes]:
    log = (settings.stack.state_dir / "demo-store.log").open("ab")
    # The demo pays through the simulated provider: on here, on loopback only.
    env = {**env, "CREDITLEDGER_STORE__SIMULATED_PROVIDER": "true"}
    return subprocess.Popen([sys.executable, "-m", "creditledger.cli", "store", "serve"],
                            env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=keep)  # fmt: skip


def store_demo(settings: Settings, store: subprocess.Popen[bytes], user: str) -> bool:
    print("\n== 7. the credit store: buy a pack, the grant goes through the outbox and the ledger")
    base = f"http://{settings.store.host}:{settings.store.port}/credit-store"
    if not wait_http(f"{base}/openapi.json", store, 60):
        print(f"the store did not start; see {Path(settings.stack.state_dir) / 'demo-store.log'}")
        return False
    products, rules = seed(settings)
    token = user_token(settings, user)
    before = call_json(base, "GET", "/balance", token)
    t0 = time.monotonic()
    order = call_json(base, "POST", "/orders", token, {"product_id": "starter"})
    checkout = f"/simulated-provider/orders/{order['order_id']}/checkout"
    paid = call_json(base, "POST", checkout, token)
    t_paid = time.monotonic()
    expected = before["balance_micro"] + order["credits_micro"]
    after = before
    deadline = t0 + 120
    while after["balance_micro"] != expected and time.monotonic() < deadline:
        time.sleep(0.05)
        after = call_json(base, "GET", "/balance", token)
    t_seen = time.monotonic()
    ok = bool(after["balance_micro"] == expected and paid["status"] == "fulfilled")
    print(f"catalogue: {products} pack(s) and {rules} reward rule(s) added")
    print(render_table(["step", "result", "ms since order"], [
        ("order created (price frozen)", f"{order['order_id']} {order['price_minor']} "
         f"{order['currency']}", "0"),
        ("paid + grant in the outbox", paid["status"], f"{(t_paid - t0) * 1000:.0f}"),
        ("balance visible in the API", f"{before['balance_micro']} -> "
         f"{after['balance_micro']} µcr", f"{(t_seen - t0) * 1000:.0f}"),
    ]))  # fmt: skip
    print(f"store demo: {'the purchase arrived once' if ok else 'MISMATCH'}")
    print(f"store page: {base}/#token={token}")
    print(f"API docs:   {base}/docs   (token above as 'Authorization: Bearer ...')")
    return ok
