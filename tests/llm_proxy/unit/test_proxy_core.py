"""The proxy's pure parts: billing headers, service auth, usage, merged price rules, client
context, the spool file format."""

from __future__ import annotations

import asyncio
import os
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import pytest

from kernel.errors import PriceRuleError, ProxyError
from kernel.settings import ServiceKey
from llm_proxy.auth import ServiceRegistry, hash_key, new_key
from llm_proxy.billing import from_headers, to_headers
from llm_proxy.client import BillingContextError, billing_context, billing_headers, current_billing
from llm_proxy.usage import bound_prompt, estimate_prompt, from_response, requested_output
from outbox import spool
from pricing.rules import TokenUsage
from pricing.source import merge, table_rows_to_rules

BASE = {"x-billing-user-id": " u-1 ", "x-billing-scene": "chat "}


def test_headers_are_trimmed_and_an_event_id_is_made_when_absent() -> None:
    ctx = from_headers({**BASE, "x-request-id": "  ", "x-billing-skip-charge": " TRUE "})
    assert (ctx.user_id, ctx.scene, ctx.request_id, ctx.skip_charge) == ("u-1", "chat", None, True)
    assert ctx.event_id.startswith("llm-") and ctx.event_id_generated
    given = from_headers({**BASE, "x-billing-event-id": " e-9 "})
    assert (given.event_id, given.event_id_generated) == ("e-9", False)
    assert to_headers(given) == {"X-Billing-User-Id": "u-1", "X-Billing-Scene": "chat",
                                 "X-Billing-Event-Id": "e-9"}  # fmt: skip


@pytest.mark.parametrize(("headers", "code", "param"), [
    ({"x-billing-scene": "chat"}, "missing_billing_header", "X-Billing-User-Id"),
    ({"x-billing-user-id": "u", "x-billing-scene": "\t"}, "missing_billing_header",
     "X-Billing-Scene"),
    ({**BASE, "x-billing-event-id": "a b"}, "invalid_billing_header", "X-Billing-Event-Id"),
    ({**BASE, "x-billing-user-id": "x" * 129}, "invalid_billing_header", "X-Billing-User-Id"),
    ({**BASE, "x-billing-skip-charge": "maybe"}, "invalid_billing_header",
     "X-Billing-Skip-Charge"),
])  # fmt: skip
def test_bad_headers_are_400_naming_the_header(headers: dict[str, str], code: str,
                                               param: str) -> None:  # fmt: skip
    with pytest.raises(ProxyError) as caught:
        from_headers(headers)
    assert (caught.value.status, caught.value.code, caught.value.param) == (400, code, param)
    assert param in caught.value.message


def test_service_auth() -> None:
    key, digest = new_key()
    assert hash_key(key) == digest and digest != key
    registry = ServiceRegistry([ServiceKey(name="svc", key_sha256=digest, scenes=["chat"])])
    service = registry.authenticate(f"Bearer {key}")
    assert service.name == "svc"
    for header in (None, "", "Bearer", f"Basic {key}", "Bearer nope"):
        with pytest.raises(ProxyError) as caught:
            registry.authenticate(header)
        assert caught.value.status == 401
    registry.authorize(service, from_headers(BASE))
    for extra in ({"x-billing-scene": "other"}, {"x-billing-skip-charge": "1"}):
        with pytest.raises(ProxyError) as caught:
            registry.authorize(service, from_headers({**BASE, **extra}))
        assert caught.value.status == 403


def test_usage_from_openai_shapes() -> None:
    usage = from_response({"prompt_tokens": 10, "completion_tokens": 7,
                           "prompt_tokens_details": {"cached_tokens": 4},
                           "completion_tokens_details": {"reasoning_tokens": 2}})  # fmt: skip
    assert usage == TokenUsage(10, 7, 4, 2)
    assert from_response({"prompt_tokens": 3, "total_tokens": 3}) == TokenUsage(3, 0)
    assert from_response(None) is None and from_response({"total": 1}) is None


def test_prompt_estimates() -> None:
    body = {"messages": [{"role": "user", "content": "hello there"},
                         {"role": "user", "content": [{"type": "text", "text": "hi"},
                                                      {"type": "image_url"}]}],
            "max_tokens": 50}  # fmt: skip
    counted = estimate_prompt(body)
    assert counted > 0
    # The hold's bound errs high, never below the tokenizer's count for plain text.
    assert bound_prompt(body) >= counted
    assert requested_output(body, 1024) == 50 and requested_output({}, 1024) == 1024


def test_the_holds_output_bound_counts_every_choice_and_the_newer_limit_first() -> None:
    assert requested_output({"n": 3}, 100) == 300
    assert requested_output({"n": 2, "max_tokens": 40}, 100) == 80
    assert requested_output({"max_completion_tokens": 7, "max_tokens": 40}, 100) == 7
    # Nonsense is ignored, never a smaller hold.
    assert requested_output({"n": 0, "max_tokens": True}, 100) == 100
    assert requested_output({"n": "4", "max_completion_tokens": -1}, 100) == 100
    assert estimate_prompt({"input": ["one two", "three"]}) >= 3


def rule_row(version: int, day: int, price: str) -> tuple[object, ...]:
    return ("r", version, datetime(2026, 1, day, tzinfo=UTC), Decimal(price), None,
            Decimal("2.000000000000"), None, 0, "ceil")  # fmt: skip


def test_price_rules_merge_file_and_table() -> None:
    file_rules = [{"id": "r", "versions": [{"version": 1, "effective_from": "2026-01-01T00:00:00Z",
                                             "input": "0.5", "output": 2}]}]  # fmt: skip
    book = merge(file_rules, table_rows_to_rules([rule_row(1, 1, "0.500000000000"),
                                                  rule_row(2, 5, "0.750000000000")]))  # fmt: skip
    assert [r.version for r in book.rules["r"]] == [1, 2]
    assert book.active("r", 1_767_225_600_000).version == 1  # 2026-01-01
    with pytest.raises(PriceRuleError, match="disagree"):
        merge(file_rules, table_rows_to_rules([rule_row(1, 1, "0.6")]))
    with pytest.raises(PriceRuleError, match="effective_from"):
        merge(file_rules, table_rows_to_rules([rule_row(2, 1, "0.6")]))


def test_client_billing_context_nests_and_reads_back() -> None:
    assert current_billing() is None
    with pytest.raises(BillingContextError):
        billing_headers()
    with billing_context(user_id=" u-1 ", scene="chat", request_id="r-1") as outer:
        assert current_billing() == outer and outer.user_id == "u-1"
        first, second = billing_headers(), billing_headers()
        assert first["X-Billing-Event-Id"] != second["X-Billing-Event-Id"]
        with billing_context(scene="search", event_id="e-1"):
            inner = current_billing()
            assert inner is not None
            assert (inner.user_id, inner.scene, inner.request_id) == ("u-1", "search", "r-1")
            assert billing_headers()["X-Billing-Event-Id"] == "e-1"

            async def in_task() -> str | None:
                ctx = current_billing()
                return ctx.scene if ctx else None

            assert asyncio.run(in_task()) == "search"
        assert current_billing() == outer
    assert current_billing() is None
    with pytest.raises(BillingContextError), billing_context(user_id="u"):
        pass
    with pytest.raises(BillingContextError), billing_context(user_id="a b", scene="s"):
        pass


def test_the_spool_directory_must_be_private(tmp_path: Path) -> None:
    event = spool.SpooledEvent("e", "topic", b"key", b"value")
    fresh = tmp_path / "a" / "spool"
    spool.append(fresh, event)  # created 0700
    assert fresh.stat().st_mode & 0o777 == 0o700
    open_to_all = tmp_path / "shared"
    open_to_all.mkdir(mode=0o755)
    open_to_all.chmod(0o777)  # what another local user could have made first
    with pytest.raises(spool.SpoolNotPrivate):
        spool.append(open_to_all, event)
    with pytest.raises(spool.SpoolNotPrivate):
        spool.pending_files(open_to_all)
    assert not list(open_to_all.iterdir())
    if os.geteuid() == 0:  # only root can give a directory away
        foreign = tmp_path / "foreign"
        foreign.mkdir(mode=0o700)
        os.chown(foreign, 4321, -1)
        with pytest.raises(spool.SpoolNotPrivate, match="uid 4321"):
            spool.pending_files(foreign)


def test_spool_lines_round_trip(tmp_path: Path) -> None:
    events = [spool.SpooledEvent(f"e{n}", "topic", b"key", bytes([n, 0xC3, 1])) for n in range(3)]
    for event in events:
        spool.append(tmp_path, event)
    [path] = spool.pending_files(tmp_path)
    data = path.read_bytes() + b'{"torn'  # a crash mid-append leaves a partial last line
    assert spool.read_events(path, data) == events
