"""Event ids under hostile or buggy callers: namespaces, fingerprints, a bounded retry.

Each test drives a real proxy (official ``openai`` SDK) against real Redis and Postgres,
and checks what reached the outbox and the upstream.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from contracts.commands import Grant
from contracts.records import GRANT_TOPIC, command_to_record
from contracts.redis_keys import event_key
from kernel.db import connect
from kernel.errors import OutboxConflict
from kernel.settings import Settings, project_path
from outbox.enqueue import enqueue
from store.domain import order_grant_event_id, reward_grant_event_id
from streams.codec import load_codec
from testbed.proxy import ProxyWorld
from testbed.topics import ScratchTopics

SHORT: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hi"}]
LONG: list[ChatCompletionMessageParam] = [{"role": "user", "content": "tell me " * 200}]
RETRY_WINDOW_S = 3.0
SERVES_MAX = 3


@pytest.fixture
def world(stack_settings: Settings, scratch: ScratchTopics, unique: str) -> Iterator[ProxyWorld]:
    codec = load_codec(project_path(stack_settings.schemas.avro_dir))
    world = ProxyWorld(stack_settings, scratch, unique, codec, proxy_settings={
        "retry_window_s": RETRY_WINDOW_S, "retry_serves_max": SERVES_MAX})  # fmt: skip
    try:
        world.start_proxy()
        yield world
    finally:
        world.cleanup()


def user() -> str:
    return f"user-{uuid.uuid4().hex[:10]}"


def refused(call: object) -> openai.APIStatusError:
    with pytest.raises(openai.APIStatusError) as caught:
        call()  # type: ignore[operator]
    return caught.value


def reused(err: openai.APIStatusError) -> bool:
    return err.status_code == 409 and isinstance(err.body, dict) \
        and err.body.get("code") == "event_id_reused"  # fmt: skip


def test_another_users_call_under_a_used_id_is_refused_before_upstream(
    world: ProxyWorld,
) -> None:
    h1, h2 = user(), user()
    world.set_balance(h1, 1_000_000)
    world.set_balance(h2, 1_000_000)
    world.client(h1, **{"X-Billing-Event-Id": "E-shared"}).chat.completions.create(
        model="chat", messages=SHORT)  # fmt: skip
    upstream_before = world.upstream_calls()
    err = refused(lambda: world.client(h2, **{"X-Billing-Event-Id": "E-shared"})
                  .chat.completions.create(model="chat", messages=LONG))  # fmt: skip
    assert reused(err), err
    assert world.upstream_calls() == upstream_before  # nothing went upstream
    [charge] = world.outbox_charges()
    assert (charge.user_id, charge.event_id) == (h1, "llm:billing:E-shared")
    assert world.holds(h2).get("#total", "0") == "0"
    assert 'llm_proxy_event_id_reused_total{stage="guard"} 1.0' in world.metrics()


def test_one_id_for_every_call_pays_every_call_but_the_first_is_refused(
    world: ProxyWorld,
) -> None:
    who = user()
    world.set_balance(who, 1_000_000)
    client = world.client(who, **{"X-Billing-Event-Id": "same-for-all"})
    client.chat.completions.create(model="chat", messages=SHORT)
    for n in range(5):  # other calls (other bodies) under the same id
        prompt: list[ChatCompletionMessageParam] = [{"role": "user", "content": f"q{n}"}]
        assert reused(refused(lambda p=prompt: client.chat.completions.create(
            model="chat", messages=p)))  # fmt: skip
    assert len(world.outbox_charges()) == 1
    # Another scene or model under the id is another call too.
    assert reused(refused(lambda: world.client(who, scene="search", **{
        "X-Billing-Event-Id": "same-for-all"}).chat.completions.create(
            model="chat", messages=SHORT)))  # fmt: skip


def test_ids_are_namespaced_by_service_and_cannot_take_the_stores(world: ProxyWorld) -> None:
    who = user()
    world.set_balance(who, 1_000_000)
    store_ids = [order_grant_event_id("o_" + "a" * 24),
                 reward_grant_event_id("signup", who, "lifetime")]  # fmt: skip
    for event_id in [*store_ids, "shared-id"]:
        world.client(who, **{"X-Billing-Event-Id": event_id}).chat.completions.create(
            model="chat", messages=SHORT)  # fmt: skip
    # The ops service's "shared-id" is its own: another ledger event, charged too.
    world.client(who, key=world.ops_key, **{"X-Billing-Event-Id": "shared-id"}
                 ).chat.completions.create(model="chat", messages=SHORT)  # fmt: skip
    ids = sorted(c.event_id for c in world.outbox_charges())
    assert ids == sorted([f"llm:billing:{i}" for i in [*store_ids, "shared-id"]]
                         + ["llm:ops:shared-id"])  # fmt: skip
    # The store's grants under those ids still go in (they would have been dropped).
    codec = world.codec
    with connect(world.env_settings()) as conn:
        for event_id in store_ids:
            grant = Grant(
                event_id=event_id,
                user_id=who,
                kind="purchase",
                amount_micro=5,
                reference="o-1",
                note=None,
                occurred_at_ms=time.time_ns() // 1_000_000,
                producer="store",
            )
            value = codec.encode(GRANT_TOPIC, command_to_record(grant))
            assert enqueue(conn, event_id, GRANT_TOPIC, who.encode(), value) == "inserted"
        conn.commit()


def test_a_retry_is_served_a_bounded_number_of_times_inside_the_window(
    world: ProxyWorld,
) -> None:
    who = user()
    world.set_balance(who, 1_000_000)
    client = world.client(who, **{"X-Billing-Event-Id": "retried"})
    for _ in range(SERVES_MAX):
        client.chat.completions.create(model="chat", messages=SHORT)
    [charge] = world.outbox_charges()
    upstream_before = world.upstream_calls()
    assert reused(refused(lambda: client.chat.completions.create(model="chat", messages=SHORT)))
    assert world.upstream_calls() == upstream_before
    # Only the charge is held; the retries' own holds are gone.
    assert world.holds(who) == {
        "#total": str(charge.amount_micro),
        charge.event_id: world.holds(who)[charge.event_id],
    }  # fmt: skip


def test_a_retry_after_the_window_is_refused(world: ProxyWorld) -> None:
    who = user()
    world.set_balance(who, 1_000_000)
    client = world.client(who, **{"X-Billing-Event-Id": "late"})
    client.chat.completions.create(model="chat", messages=SHORT)
    time.sleep(RETRY_WINDOW_S + 0.5)
    assert reused(refused(lambda: client.chat.completions.create(model="chat", messages=SHORT)))
    assert len(world.outbox_charges()) == 1


def forget(world: ProxyWorld, event_id: str) -> None:
    """What Redis losing the id's record looks like (its memory expired, or a restart)."""
    client = world.redis()
    client.delete(event_key(world.prefix, event_id))
    client.close()


def test_the_outbox_refuses_a_reused_id_the_guard_could_not_see(world: ProxyWorld) -> None:
    """Redis forgot the id (memory expired, or Redis was down): the call runs, but its charge
    meets the first one in the outbox, and the call is refused, not served free."""
    who, other = user(), user()
    world.set_balance(who, 1_000_000)
    world.set_balance(other, 1_000_000)
    world.client(who, **{"X-Billing-Event-Id": "forgotten"}).chat.completions.create(
        model="chat", messages=SHORT)  # fmt: skip
    forget(world, "llm:billing:forgotten")
    for stream in (False, True):
        client = world.client(other, **{"X-Billing-Event-Id": "forgotten"})
        if stream:
            with pytest.raises(openai.APIError):  # the stream ends without [DONE]
                for _chunk in client.chat.completions.create(model="chat", messages=LONG,
                                                             stream=True):  # fmt: skip
                    pass
        else:
            assert reused(refused(lambda c=client: c.chat.completions.create(
                model="chat", messages=LONG)))  # fmt: skip
        forget(world, "llm:billing:forgotten")
    [charge] = world.outbox_charges()
    assert charge.user_id == who
    assert 'llm_proxy_event_id_reused_total{stage="outbox"} 2.0' in world.metrics()
    assert world.holds(other).get("#total", "0") == "0"


def test_outbox_enqueue_tells_a_retry_from_a_reused_id(world: ProxyWorld) -> None:
    with connect(world.env_settings()) as conn:
        assert enqueue(conn, "x:1", GRANT_TOPIC, b"k", b"v1") == "inserted"
        assert enqueue(conn, "x:1", GRANT_TOPIC, b"k", b"v1") == "duplicate"
        assert enqueue(conn, "x:2", GRANT_TOPIC, b"k", b"v1", "fp-a") == "inserted"
        assert enqueue(conn, "x:2", GRANT_TOPIC, b"k", b"other bytes", "fp-a") == "duplicate"
        with pytest.raises(OutboxConflict):
            enqueue(conn, "x:1", GRANT_TOPIC, b"k", b"v2")
        with pytest.raises(OutboxConflict):
            enqueue(conn, "x:2", GRANT_TOPIC, b"k", b"v1", "fp-b")
        conn.commit()
        rows = conn.execute("SELECT event_id, message_value FROM outbox WHERE event_id LIKE "
                            "'x:%' ORDER BY event_id").fetchall()  # fmt: skip
    assert [(e, bytes(v)) for e, v in rows] == [("x:1", b"v1"), ("x:2", b"v1")]
