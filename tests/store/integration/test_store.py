"""The credit store on the real stack: auth, orders, payments, rewards, price rules, 410s."""

from __future__ import annotations

import asyncio
import json
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

import pytest
from openai.types.chat import ChatCompletionMessageParam

from contracts.tokens import Role
from kernel.db import connect
from kernel.errors import StoreError
from kernel.settings import Settings
from store.repository import StoreRepository
from testbed.store import StoreWorld, store_world
from testbed.topics import ScratchTopics

PROMPT: list[ChatCompletionMessageParam] = [{"role": "user", "content": "count to five"}]


@pytest.fixture
def world(stack_settings: Settings, scratch: ScratchTopics, unique: str) -> Iterator[StoreWorld]:
    with store_world(stack_settings, scratch, unique) as world:
        yield world


USER_ROUTES = [
    ("GET", "/balance"), ("GET", "/consumption?period=7d"), ("GET", "/ledger"),
    ("GET", "/products"), ("POST", "/orders"), ("GET", "/orders"),
    ("GET", "/orders/o_000000000000000000000000"), ("POST", "/rewards/daily-checkin/claim"),
    ("GET", "/rewards"), ("POST", "/orders/o_000000000000000000000000/cancel"),
    ("POST", "/simulated-provider/orders/o_000000000000000000000000/checkout"),
]  # fmt: skip
ADMIN_ROUTES = [
    ("GET", "/admin/users/someone/ledger"), ("GET", "/admin/users/someone/balance"),
    ("GET", "/admin/products"), ("PUT", "/admin/products/p1"), ("GET", "/admin/price-rules"),
    ("POST", "/admin/price-rules/test-chat/versions"), ("GET", "/admin/reward-rules"),
    ("PUT", "/admin/reward-rules/r1"), ("DELETE", "/admin/reward-rules/daily-checkin"),
]  # fmt: skip


def test_every_route_refuses_missing_tampered_and_expired_tokens(world: StoreWorld) -> None:
    good = world.token("alice")
    payload, mac = good.split(".")
    tampered = [
        payload[:-2] + ("AA" if payload[-2:] != "AA" else "BB") + "." + mac,  # payload changed
        payload + "." + mac[:-2] + ("AA" if mac[-2:] != "AA" else "BB"),  # signature changed
        world.token("alice").replace(".", ""),  # not a token
    ]
    expired = world.token("alice", ttl_s=-1)
    for method, path in USER_ROUTES + ADMIN_ROUTES:
        status, body = world.call(method, path, body={} if method in ("POST", "PUT") else None)
        assert status == 401, (method, path, body)
        assert body["error"]["code"] == "missing_token"
        for bad in tampered:
            status, body = world.call(method, path, token=bad)
            assert status == 401, (method, path, bad, body)
        status, body = world.call(method, path, token=expired)
        assert status == 401, (method, path, body)
        assert body["error"]["code"] == "token_expired"


def test_admin_routes_refuse_users_and_services(world: StoreWorld) -> None:
    roles: list[Role] = ["user", "service"]
    for role in roles:
        token = world.token("bob", role)
        for method, path in ADMIN_ROUTES:
            body: dict[str, object] | None = {} if method in ("POST", "PUT") else None
            status, answer = world.call(method, path, token=token, body=body)
            assert status == 403, (role, method, path, answer)
    admin = world.token("root", "admin")
    status, rules = world.call("GET", "/admin/reward-rules", token=admin)
    assert status == 200
    assert {r["rule_id"] for r in rules} >= {"signup-bonus", "daily-checkin"}


def test_a_user_sees_only_its_own_orders_and_data(world: StoreWorld) -> None:
    alice, mallory = world.token("alice"), world.token("mallory")
    status, order = world.call("POST", "/orders", token=alice, body={"product_id": "starter"})
    assert status == 201
    order_id = order["order_id"]
    for method, path in [("GET", f"/orders/{order_id}"), ("POST", f"/orders/{order_id}/cancel"),
                         ("POST", f"/simulated-provider/orders/{order_id}/checkout")]:  # fmt: skip
        status, body = world.call(method, path, token=mallory)
        assert status == 404, (path, body)
    status, orders = world.call("GET", "/orders", token=mallory)
    assert status == 200
    assert orders == []
    status, body = world.call("POST", "/rewards/daily-checkin/claim", token=mallory,
                              body={"user_id": "alice"})  # fmt: skip
    assert status == 403
    assert world.order_status(order_id) == "created"


def test_concurrent_and_repeated_payment_callbacks_grant_once(world: StoreWorld) -> None:
    alice = world.token("alice")
    _, order = world.call("POST", "/orders", token=alice, body={"product_id": "standard"})
    assert order["price_minor"] == 2000  # frozen at creation
    admin = world.token("root", "admin")
    status, _ = world.call("PUT", "/admin/products/standard", token=admin, body={
        "name": "Standard pack", "credits_micro": 50_000_000, "original_price_minor": 2500,
        "price_minor": 2400, "currency": "USD"})  # fmt: skip
    assert status == 200
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda _: world.pay(order, "pay-1"), range(16)))
    assert [status for status, _ in results] == [200] * 16, results
    # A callback that found another one fulfilling answers "paid"; the grant is made once.
    assert {body["status"] for _, body in results} <= {"paid", "fulfilled"}
    assert world.order_status(order["order_id"]) == "fulfilled"
    # Late repeats, another payment of the same order, a wrong amount, a bad signature.
    assert world.pay(order, "pay-1")[0] == 200
    status, body = world.pay(order, "pay-2")
    assert (status, body["error"]["code"]) == (409, "already_paid")
    status, body = world.pay(order, "pay-1", amount_minor=2400)
    assert (status, body["error"]["code"]) == (409, "amount_mismatch")
    status, body = world.pay(order, "pay-1", signature="00" * 32)
    assert (status, body["error"]["code"]) == (401, "invalid_signature")
    grants = world.outbox_grants()
    assert [(g.event_id, g.kind, g.amount_micro, g.user_id) for g in grants] == [
        (f"order:{order['order_id']}", "purchase", 50_000_000, "alice")]  # fmt: skip


def test_cancelled_orders_refuse_payment_and_expired_ones_take_a_late_one(
        world: StoreWorld) -> None:  # fmt: skip
    alice = world.token("alice")
    _, cancelled = world.call("POST", "/orders", token=alice, body={"product_id": "starter"})
    status, body = world.call("POST", f"/orders/{cancelled['order_id']}/cancel", token=alice)
    assert (status, body["status"]) == (200, "cancelled")
    status, body = world.pay(cancelled, "pay-c")
    assert (status, body["error"]["code"]) == (409, "order_cancelled")
    _, late = world.call("POST", "/orders", token=alice, body={"product_id": "starter"})
    with connect(world.env_settings()) as conn:
        conn.execute("UPDATE orders SET expires_at = now() - interval '1 s' WHERE order_id = %s",
                     (late["order_id"],))  # fmt: skip
        conn.commit()
    deadline = time.monotonic() + 20
    while world.order_status(late["order_id"]) != "expired":
        assert time.monotonic() < deadline, "the sweep did not expire the order"
        time.sleep(0.1)
    status, body = world.pay(late, "pay-late")
    assert (status, body["status"]) == (200, "fulfilled")
    assert world.pay(late, "pay-late")[0] == 200
    assert [g.event_id for g in world.outbox_grants()] == [f"order:{late['order_id']}"]


def test_reward_caps_idempotency_and_concurrent_claims(world: StoreWorld) -> None:
    alice, service = world.token("alice"), world.token("forum", "service")
    with ThreadPoolExecutor(20) as pool:
        results = list(
            pool.map(
                lambda _: world.call("POST", "/rewards/daily-checkin/claim", token=alice), range(20)
            )
        )
    assert sorted(status for status, _ in results) == [200] * 19 + [201]
    assert sum(body["granted"] for _, body in results) == 1
    assert world.call("POST", "/rewards/signup-bonus/claim", token=alice)[0] == 201
    assert world.call("POST", "/rewards/signup-bonus/claim", token=alice)[0] == 200
    # Event rewards: claimed by the service that saw the event, 5 per day.
    status, body = world.call("POST", "/rewards/plaza-plan-imported/claim", token=alice,
                              body={"reference": "imp-x"})  # fmt: skip
    assert status == 403
    outcomes = [world.call("POST", "/rewards/plaza-plan-imported/claim", token=service,
                           body={"user_id": "alice", "reference": f"imp-{n}"})
                for n in range(7)]  # fmt: skip
    assert [status for status, _ in outcomes] == [201] * 5 + [409] * 2
    assert outcomes[5][1]["error"]["code"] == "reward_cap_reached"
    again = world.call("POST", "/rewards/plaza-plan-imported/claim", token=service,
                       body={"user_id": "alice", "reference": "imp-0"})  # fmt: skip
    assert (again[0], again[1]["granted"]) == (200, False)
    status, body = world.call("POST", "/rewards/plaza-plan-imported/claim", token=service,
                              body={"user_id": "alice"})  # fmt: skip
    assert (status, body["error"]["code"]) == (400, "reference_required")
    grants = sorted((g.event_id, g.amount_micro) for g in world.outbox_grants())
    day = datetime.now(UTC).date().isoformat()
    assert grants == sorted([
        (f"reward:daily-checkin:alice:day:{day}", 500_000),
        ("reward:signup-bonus:alice:lifetime", 5_000_000),
        *[(f"reward:plaza-plan-imported:alice:imp-{n}", 1_000_000) for n in range(5)],
    ])  # fmt: skip


def test_reward_periods_and_active_windows_at_their_boundaries(world: StoreWorld) -> None:
    settings = world.env_settings()

    async def run() -> None:
        repo = StoreRepository(settings, world.codec, dsn=world.dsn)
        await repo.start()
        try:
            start = datetime(2026, 3, 1, tzinfo=UTC)
            for rule_id, kind, period, cap in [("b-day", "event", "day", 2),
                                               ("b-week", "event", "week", 1),
                                               ("b-month", "checkin", "month", 1)]:  # fmt: skip
                await repo.put_reward_rule({
                    "rule_id": rule_id, "kind": kind, "description": "", "amount_micro": 7,
                    "cap_per_period": cap, "period": period,
                    "trigger_event": "t.e" if kind == "event" else None,
                    "active_from": start,
                    "active_until": datetime(2026, 4, 1, tzinfo=UTC)})  # fmt: skip

            async def granted(rule: str, at: datetime, ref: str | None = None) -> bool | str:
                try:
                    loaded = await repo.reward_rule(rule)
                    return (await repo.claim(loaded, "carol", ref, at)).granted
                except StoreError as exc:
                    return exc.code

            last_of_day = datetime(2026, 3, 10, 23, 59, 59, 999999, tzinfo=UTC)
            assert await granted("b-day", last_of_day, "e1") is True
            assert await granted("b-day", last_of_day, "e2") is True
            assert await granted("b-day", last_of_day, "e3") == "reward_cap_reached"
            assert await granted("b-day", last_of_day + timedelta(microseconds=1), "e3") is True
            sunday = datetime(2026, 3, 15, 23, 59, 59, tzinfo=UTC)  # a Sunday
            assert await granted("b-week", sunday, "w1") is True
            assert await granted("b-week", sunday - timedelta(days=6), "w2") == (
                "reward_cap_reached"
            )  # Monday of the same week
            assert await granted("b-week", sunday + timedelta(seconds=1), "w2") is True
            assert await granted("b-month", datetime(2026, 3, 31, 23, 59, tzinfo=UTC)) is True
            assert await granted("b-month", start) is False  # same month: the same claim
            # Active windows: from is inclusive, until exclusive.
            assert await granted("b-day", start - timedelta(microseconds=1), "x") == (
                "reward_inactive"
            )
            assert await granted("b-day", start, "x") is True
            assert await granted("b-month", datetime(2026, 4, 1, tzinfo=UTC)) == ("reward_inactive")
        finally:
            await repo.close()

    asyncio.run(run())


def test_a_new_price_version_prices_new_calls_only(world: StoreWorld) -> None:
    world.start_upstream()  # a store world starts no model of its own
    world.start_proxy()
    world.set_balance("dave", 10**9)
    client = world.client("dave")
    client.chat.completions.create(model="chat", messages=PROMPT)
    admin = world.token("root", "admin")
    status, version = world.call("POST", "/admin/price-rules/test-chat/versions", token=admin,
                                 body={"input_micro": "20", "output_micro": "40"})  # fmt: skip
    assert status == 201, version
    assert version["version"] == 2
    before = world.outbox_charges()
    deadline = time.monotonic() + 20
    while True:  # the proxy re-reads the table every 0.5 s here
        client.chat.completions.create(model="chat", messages=PROMPT)
        charges = world.outbox_charges()
        if charges[-1].price_rule_version == 2:
            break
        assert time.monotonic() < deadline, "the proxy never picked up version 2"
        time.sleep(0.2)
    first, newest = charges[0], charges[-1]
    assert first == before[0]  # the past charge is untouched
    assert (first.price_rule_version, first.amount_micro) == (1, 10 * 6 + 20 * 5)
    assert (newest.price_rule_version, newest.amount_micro) == (2, 20 * 6 + 40 * 5)
    status, body = world.call("POST", "/admin/price-rules/test-chat/versions", token=admin,
                              body={"input_micro": "1", "output_micro": "1",
                                    "effective_from": "2020-01-01T00:00:00Z"})  # fmt: skip
    assert (status, body["error"]["code"]) == (400, "effective_in_past")
    client.close()


def test_the_token_store_is_gone(world: StoreWorld) -> None:
    root = world.store_url.removesuffix("/credit-store")
    for method, path in [("GET", "/token-store"), ("GET", "/token-store/balance"),
                         ("POST", "/token-store/orders")]:  # fmt: skip
        request = urllib.request.Request(root + path, method=method, data=b"{}")
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(request, timeout=10)
        assert caught.value.code == 410, path
        body = json.loads(caught.value.read())
        assert body["error"]["location"] == "/credit-store"


def test_bad_input_is_a_precise_4xx(world: StoreWorld) -> None:
    alice, admin = world.token("alice"), world.token("root", "admin")
    cases = [
        ("POST", "/orders", alice, {"product_id": "nope"}, 404, "product_not_found"),
        ("POST", "/orders", alice, {"product_id": "BAD ID"}, 422, "invalid_request"),
        ("POST", "/orders", alice, {"product_id": "starter", "x": 1}, 422, "invalid_request"),
        ("GET", "/ledger?cursor=zzz", alice, None, 400, "invalid_query"),
        ("GET", "/ledger?limit=0", alice, None, 422, "invalid_request"),
        ("GET", "/consumption?period=1y", alice, None, 422, "invalid_request"),
        ("POST", "/rewards/nope/claim", alice, None, 404, "reward_rule_not_found"),
        ("PUT", "/admin/products/p1", admin, {"name": "x", "credits_micro": 1,
         "original_price_minor": 1, "price_minor": 2, "currency": "USD"}, 400,
         "invalid_product"),
        ("POST", "/admin/price-rules/test-chat/versions", admin,
         {"input_micro": "-1", "output_micro": "1"}, 422, "invalid_request"),
        ("PUT", "/admin/reward-rules/r1", admin, {"kind": "event", "amount_micro": 1,
         "cap_per_period": 1, "period": "day"}, 400, "invalid_reward_rule"),
        ("PUT", "/admin/products/p1", admin, {"name": "a\u0000b", "credits_micro": 1,
         "original_price_minor": 1, "price_minor": 1, "currency": "USD"}, 422,
         "invalid_request"),
    ]  # fmt: skip
    for method, path, token, body, status, code in cases:
        got_status, got = world.call(method, path, token=token, body=body)
        assert (got_status, got["error"]["code"]) == (status, code), (path, body, got)


def test_a_service_token_claims_only_event_rewards(world: StoreWorld) -> None:
    service = world.token("forum", "service")
    for rule in ("signup-bonus", "daily-checkin"):
        status, body = world.call("POST", f"/rewards/{rule}/claim", token=service,
                                  body={"user_id": "victim"})  # fmt: skip
        assert status == 403, (rule, body)
        assert "only event rewards" in body["error"]["message"]
    status, _ = world.call("POST", "/rewards/plaza-plan-imported/claim", token=service,
                           body={"user_id": "victim", "reference": "imp-1"})  # fmt: skip
    assert status == 201
    assert [g.event_id for g in world.outbox_grants()] == [
        "reward:plaza-plan-imported:victim:imp-1"]  # fmt: skip


def test_tokens_have_one_spelling_and_signatures_are_hex(world: StoreWorld) -> None:
    good = world.token("alice")
    assert world.call("GET", "/balance", token=good)[0] == 200
    payload, mac = good.split(".")
    # The same bytes spelt otherwise: foreign characters the lenient decoder skipped, and a
    # last character that differs only in the bits base64 does not use.
    last = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_".index(mac[-1])
    sibling = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"[last ^ 1]
    for spelling in (f"{payload}.{mac[:10]}!!{mac[10:]}", f"{payload}.{mac}==",
                     f"{payload}.{mac[:-1]}{sibling}", f"{payload}.{mac}.x"):  # fmt: skip
        status, body = world.call("GET", "/balance", token=spelling)
        assert status == 401, (spelling, body)
    _, order = world.call("POST", "/orders", token=good, body={"product_id": "starter"})
    for signature in ("zz" * 32, "é" * 64, "abc"):
        status, body = world.pay(order, "pay-1", signature=signature)
        assert (status, body["error"]["code"]) == (401, "invalid_signature"), signature


def test_request_bodies_are_limited_before_they_are_parsed(world: StoreWorld) -> None:
    big = b'{"payment_reference": "' + b"x" * 100_000 + b'"}'
    host, port = "127.0.0.1", world.store_port
    path = "/credit-store/orders/o_000000000000000000000000/pay"
    for framing in (f"Content-Length: {len(big)}", "Transfer-Encoding: chunked"):
        body = big if "Length" in framing else (
            f"{len(big):x}\r\n".encode() + big + b"\r\n0\r\n\r\n")  # fmt: skip
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"X-Payment-Signature: {'0' * 64}\r\n{framing}\r\nConnection: close\r\n\r\n"
        )
        with socket.create_connection((host, port), timeout=10) as sock:
            sock.sendall(head.encode() + body)
            reply = b""
            while chunk := sock.recv(65536):
                reply += chunk
        assert reply.startswith(b"HTTP/1.1 413"), (framing, reply[:200])
        assert b'"request_too_large"' in reply
    # A body under the limit still reaches the route (and its own checks).
    status, body = world.call("POST", "/orders", token=world.token("alice"),
                              body={"product_id": "starter"})  # fmt: skip
    assert status == 201, body
