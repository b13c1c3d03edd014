"""SIGKILL of the credit store between "paid" and "grant in the outbox": the grant still
happens, once, and the ledger equals the model of what was bought."""

from __future__ import annotations

import contextlib
import threading
import time

import pytest

from kernel.db import connect
from testbed.ledger import WorkerGroup
from testbed.proxy import wait_for
from testbed.store import StoreWorld

PACKS = {"starter": 10_000_000, "standard": 50_000_000, "pro": 200_000_000}


@pytest.fixture
def world(ledger_store_world: StoreWorld) -> StoreWorld:
    return ledger_store_world


# With two workers the killed request may be in either one, and only worker 0 sweeps.
@pytest.mark.parametrize("store_workers", ["1", "2"])
def test_store_killed_between_payment_and_grant_grants_once(
    world: StoreWorld, unique: str, store_workers: str
) -> None:
    users = [f"{unique}-buyer{n}" for n in range(3)]
    model: dict[str, int] = {user: 0 for user in users}  # what each user bought
    orders: list[str] = []
    # The pause between "paid" and the fulfilment is where the store is killed. The sweep
    # runs once at each start, then not for a minute: only a restart can repair the order.
    world.start_store(fulfil_delay_ms="3000", fulfil_interval_s="60", workers=store_workers)
    for round_number, user in enumerate(users):
        token = world.token(user)
        product = list(PACKS)[round_number]
        status, order = world.call("POST", "/orders", token=token, body={"product_id": product})
        assert status == 201
        order_id = order["order_id"]
        path = f"/simulated-provider/orders/{order_id}/checkout"

        def checkout(path: str = path, token: str = token) -> None:
            # The store dies under this request: its connection error is the expected end.
            with contextlib.suppress(OSError):
                world.call("POST", path, token=token, timeout=10)

        caller = threading.Thread(target=checkout, daemon=True)
        caller.start()
        wait_for("order paid", lambda oid=order_id: world.order_status(oid) == "paid", 20, world)
        world.kill("store")
        caller.join(15)
        assert world.order_status(order_id) == "paid"
        assert f"order:{order_id}" not in {g.event_id for g in world.outbox_grants()}
        model[user] += PACKS[product]
        orders.append(order_id)
        # The restarted store's sweep finishes what the killed one left "paid".
        world.start_store()
        fulfilled = lambda oid=order_id: world.order_status(oid) == "fulfilled"  # noqa: E731
        wait_for("the sweep fulfilled the order", fulfilled, 30, world)
    # The payment provider retries every callback afterwards: nothing changes.
    for order_id in orders:
        with connect(world.env_settings()) as conn:
            row = conn.execute("SELECT price_minor, currency, payment_reference FROM orders "
                               "WHERE order_id = %s", (order_id,)).fetchone()  # fmt: skip
        assert row is not None
        order = {"order_id": order_id, "price_minor": row[0], "currency": row[1]}
        assert world.pay(order, row[2])[0] == 200
    grants = world.outbox_grants()
    assert sorted(g.event_id for g in grants) == sorted(f"order:{o}" for o in orders)
    # Through the relay, a real ledger worker and the Postgres projector.
    workers = WorkerGroup(unique, world.env_settings())
    workers.start("w1")
    try:
        world.start_relay()
        world.start_process("project-postgres", "project", "postgres")

        def ledger() -> dict[str, tuple[int, int]]:
            with connect(world.env_settings()) as conn:
                rows = conn.execute(
                    "SELECT user_id, count(*), sum(amount_micro) FROM ledger_entries "
                    "WHERE user_id = ANY(%s) GROUP BY user_id", (users,)).fetchall()  # fmt: skip
            return {user: (int(n), int(total)) for user, n, total in rows}

        expected = {user: (1, model[user]) for user in users}
        wait_for("grants folded into the ledger", lambda: ledger() == expected, 240, world)
        time.sleep(2)  # anything doubled would show up now
        assert ledger() == expected
    finally:
        workers.cleanup()
