"""The credit store's Postgres side: products, orders, reward rules and claims, price rules.

Every change that earns credits writes its ``credit.grant.requested`` event into
the outbox (migration 0002) in the same transaction as the state change, with an
event id derived from the order or the claim, so no crash can lose a grant or
make two:

- a payment moves an order to ``paid`` (idempotent by payment reference; the
  row lock serialises concurrent callbacks);
- fulfilment then writes the grant and moves the order to ``fulfilled`` in one
  transaction. A crash between the two leaves a ``paid`` order, which the
  fulfiller sweep (:meth:`StoreRepository.fulfil_pending`) finishes; the
  outbox's unique event id makes a second attempt add nothing;
- a reward claim inserts its row (unique by rule, user, reference), bumps the
  per-period counter only while under the cap, and writes the grant, all in
  one transaction.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import psycopg
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

from contracts.commands import Grant
from contracts.records import GRANT_TOPIC, command_to_record, to_ms
from kernel.db import open_pool
from kernel.errors import CreditLedgerError, StoreError
from kernel.settings import Settings
from outbox.enqueue import enqueue_async
from pricing.source import TABLE_QUERY, merge, table_rows_to_rules
from store.domain import (
    Period,
    RewardKind,
    claim_reference,
    is_active,
    order_grant_event_id,
    period_start,
    reward_grant_event_id,
)
from streams.codec import AvroCodec

Row = dict[str, Any]

ORDER_COLUMNS = (
    "order_id, user_id, product_id, credits_micro, price_minor, currency, status, "
    "payment_reference, grant_event_id, created_at, expires_at, paid_at, fulfilled_at, "
    "cancelled_at"
)
PRODUCT_COLUMNS = (
    "product_id, name, credits_micro, original_price_minor, price_minor, currency, "
    "active_from, active_until, sort_order"
)
RULE_COLUMNS = (
    "rule_id, kind, description, amount_micro, cap_per_period, period, trigger_event, "
    "active_from, active_until, updated_at"
)


@dataclass(frozen=True)
class PaymentOutcome:
    order: Row
    newly_paid: bool


@dataclass(frozen=True)
class ClaimOutcome:
    claim: Row
    granted: bool  # False: this claim existed already (same rule, user and reference)


class StoreRepository:
    def __init__(self, settings: Settings, codec: AvroCodec, *, dsn: str | None = None,
                 pool_size: int = 10) -> None:  # fmt: skip
        self.settings = settings
        self.codec = codec
        self.dsn = dsn or settings.postgres_dsn
        self.pool_size = pool_size
        self._pool: AsyncConnectionPool[Any] | None = None

    async def start(self) -> None:
        self._pool = await open_pool(self.settings, dsn=self.dsn, size=self.pool_size)

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    @property
    def pool(self) -> AsyncConnectionPool[Any]:
        if self._pool is None:
            raise CreditLedgerError("StoreRepository used before start()")
        return self._pool

    async def _all(self, sql: str, params: Any = None) -> list[Row]:
        async with self.pool.connection() as conn:
            cursor = conn.cursor(row_factory=dict_row)
            await cursor.execute(sql, params)
            rows: list[Row] = await cursor.fetchall()
            return rows

    async def _one(self, sql: str, params: Any = None) -> Row | None:
        rows = await self._all(sql, params)
        return rows[0] if rows else None

    async def _enqueue_grant(self, conn: psycopg.AsyncConnection[Any], grant: Grant) -> None:
        """The grant into the outbox, in the caller's transaction. Its event id is derived
        from the order or the claim, in the store's own namespace (no proxy caller can send
        ``order:`` or ``reward:`` ids: theirs are ``llm:<service>:...``), so a taken id means
        a bug: OutboxConflict rolls the whole state change back rather than lose the grant."""
        value = self.codec.encode(GRANT_TOPIC, command_to_record(grant))
        await enqueue_async(conn, grant.event_id, GRANT_TOPIC, grant.user_id.encode(), value)

    # -- products --------------------------------------------------------------------------

    async def products(self, at: datetime | None, *, include_inactive: bool = False) -> list[Row]:
        where = (
            ""
            if include_inactive
            else ("WHERE active_from <= %(at)s AND (active_until IS NULL OR active_until > %(at)s)")
        )
        return await self._all(f"SELECT {PRODUCT_COLUMNS} FROM products {where} "
                               "ORDER BY sort_order, product_id", {"at": at})  # fmt: skip

    async def put_product(self, product: Row) -> Row:
        row = await self._one(
            f"INSERT INTO products ({PRODUCT_COLUMNS}) VALUES (%(product_id)s, %(name)s, "
            "%(credits_micro)s, %(original_price_minor)s, %(price_minor)s, %(currency)s, "
            "%(active_from)s, %(active_until)s, %(sort_order)s) ON CONFLICT (product_id) DO "
            "UPDATE SET name = EXCLUDED.name, credits_micro = EXCLUDED.credits_micro, "
            "original_price_minor = EXCLUDED.original_price_minor, price_minor = "
            "EXCLUDED.price_minor, currency = EXCLUDED.currency, active_from = "
            "EXCLUDED.active_from, active_until = EXCLUDED.active_until, sort_order = "
            f"EXCLUDED.sort_order RETURNING {PRODUCT_COLUMNS}", product,
        )  # fmt: skip
        assert row is not None
        return row

    # -- orders ----------------------------------------------------------------------------

    async def create_order(self, user_id: str, product_id: str, now: datetime) -> Row:
        """A new order at the product's current price, frozen from here on."""
        order_id = "o_" + secrets.token_hex(12)
        expires = now + timedelta(seconds=self.settings.store.order_ttl_s)
        row = await self._one(
            f"INSERT INTO orders (order_id, user_id, product_id, credits_micro, price_minor, "
            f"currency, created_at, expires_at) SELECT %s, %s, product_id, credits_micro, "
            f"price_minor, currency, %s, %s FROM products WHERE product_id = %s AND "
            f"active_from <= %s AND (active_until IS NULL OR active_until > %s) "
            f"RETURNING {ORDER_COLUMNS}",
            (order_id, user_id, now, expires, product_id, now, now),
        )  # fmt: skip
        if row is None:
            raise StoreError(404, "product_not_found", f"no product {product_id!r} on sale now")
        return row

    async def order(self, order_id: str) -> Row | None:
        return await self._one(f"SELECT {ORDER_COLUMNS} FROM orders WHERE order_id = %s",
                               (order_id,))  # fmt: skip

    async def orders(self, user_id: str, limit: int) -> list[Row]:
        return await self._all(f"SELECT {ORDER_COLUMNS} FROM orders WHERE user_id = %s "
                               "ORDER BY created_at DESC, order_id DESC LIMIT %s",
                               (user_id, limit))  # fmt: skip

    async def cancel_order(self, user_id: str, order_id: str, now: datetime) -> Row:
        row = await self._one(
            f"UPDATE orders SET status = 'cancelled', cancelled_at = %s WHERE order_id = %s "
            f"AND user_id = %s AND status = 'created' RETURNING {ORDER_COLUMNS}",
            (now, order_id, user_id),
        )  # fmt: skip
        if row is not None:
            return row
        existing = await self.order(order_id)
        if existing is None or existing["user_id"] != user_id:
            raise StoreError(404, "order_not_found", f"no order {order_id!r}")
        raise StoreError(409, "order_not_cancellable",
                         f"order {order_id!r} is {existing['status']}; only a created order "
                         "can be cancelled")  # fmt: skip

    async def record_payment(self, order_id: str, payment_reference: str, amount_minor: int,
                             currency: str, now: datetime) -> PaymentOutcome:  # fmt: skip
        """Mark the order paid, once: a repeated callback finds it paid by the same payment."""
        async with self.pool.connection() as conn, conn.transaction():
            cursor = conn.cursor(row_factory=dict_row)
            await cursor.execute(f"SELECT {ORDER_COLUMNS} FROM orders WHERE order_id = %s "
                                 "FOR UPDATE", (order_id,))  # fmt: skip
            order = await cursor.fetchone()
            if order is None:
                raise StoreError(404, "order_not_found", f"no order {order_id!r}")
            if (order["price_minor"], order["currency"]) != (amount_minor, currency):
                raise StoreError(409, "amount_mismatch", f"order {order_id!r} costs "
                                 f"{order['price_minor']} {order['currency']}, the payment "
                                 f"says {amount_minor} {currency}")  # fmt: skip
            if order["status"] in ("paid", "fulfilled"):
                if order["payment_reference"] == payment_reference:
                    return PaymentOutcome(order, newly_paid=False)
                raise StoreError(409, "already_paid", f"order {order_id!r} was paid by another "
                                 "payment; refund this one")  # fmt: skip
            if order["status"] == "cancelled":
                raise StoreError(409, "order_cancelled", f"order {order_id!r} was cancelled; "
                                 "refund this payment")  # fmt: skip
            try:
                await cursor.execute(
                    f"UPDATE orders SET status = 'paid', payment_reference = %s, paid_at = %s "
                    f"WHERE order_id = %s RETURNING {ORDER_COLUMNS}",
                    (payment_reference, now, order_id),
                )  # fmt: skip
            except psycopg.errors.UniqueViolation as exc:
                raise StoreError(409, "payment_reused", f"payment {payment_reference!r} "
                                 "already paid another order") from exc  # fmt: skip
            paid = await cursor.fetchone()
            assert paid is not None
            return PaymentOutcome(paid, newly_paid=True)

    async def fulfil(self, order_id: str) -> bool:
        """Write the paid order's grant to the outbox and mark it fulfilled; False if not paid."""
        async with self.pool.connection() as conn, conn.transaction():
            cursor = conn.cursor(row_factory=dict_row)
            await cursor.execute(f"SELECT {ORDER_COLUMNS} FROM orders WHERE order_id = %s "
                                 "AND status = 'paid' FOR UPDATE SKIP LOCKED",
                                 (order_id,))  # fmt: skip
            order = await cursor.fetchone()
            if order is None:
                return False
            event_id = order_grant_event_id(order_id)
            grant = Grant(event_id=event_id, user_id=order["user_id"], kind="purchase",
                          amount_micro=order["credits_micro"], reference=order_id,
                          note=f"product {order['product_id']}",
                          occurred_at_ms=to_ms(order["paid_at"]),
                          producer=self.settings.store.producer_name)  # fmt: skip
            await self._enqueue_grant(conn, grant)
            await cursor.execute("UPDATE orders SET status = 'fulfilled', grant_event_id = %s, "
                                 "fulfilled_at = now() WHERE order_id = %s",
                                 (event_id, order_id))  # fmt: skip
            return True

    async def fulfil_pending(self, limit: int = 100) -> int:
        """Fulfil paid orders left behind (a crash after payment); how many were done."""
        rows = await self._all("SELECT order_id FROM orders WHERE status = 'paid' "
                               "ORDER BY paid_at LIMIT %s", (limit,))  # fmt: skip
        done = 0
        for row in rows:
            done += await self.fulfil(row["order_id"])
        return done

    async def expire_orders(self, now: datetime) -> int:
        async with self.pool.connection() as conn:
            cursor = await conn.execute(
                "UPDATE orders SET status = 'expired' WHERE status = 'created' AND "
                "expires_at <= %s", (now,))  # fmt: skip
            return int(cursor.rowcount)

    # -- rewards ---------------------------------------------------------------------------

    async def reward_rules(self) -> list[Row]:
        return await self._all(f"SELECT {RULE_COLUMNS} FROM reward_rules ORDER BY rule_id")

    async def reward_rule(self, rule_id: str) -> Row | None:
        return await self._one(f"SELECT {RULE_COLUMNS} FROM reward_rules WHERE rule_id = %s",
                               (rule_id,))  # fmt: skip

    async def put_reward_rule(self, rule: Row) -> Row:
        row = await self._one(
            "INSERT INTO reward_rules (rule_id, kind, description, amount_micro, "
            "cap_per_period, period, trigger_event, active_from, active_until) VALUES "
            "(%(rule_id)s, %(kind)s, %(description)s, %(amount_micro)s, %(cap_per_period)s, "
            "%(period)s, %(trigger_event)s, %(active_from)s, %(active_until)s) "
            "ON CONFLICT (rule_id) DO UPDATE SET kind = EXCLUDED.kind, description = "
            "EXCLUDED.description, amount_micro = EXCLUDED.amount_micro, cap_per_period = "
            "EXCLUDED.cap_per_period, period = EXCLUDED.period, trigger_event = "
            "EXCLUDED.trigger_event, active_from = EXCLUDED.active_from, active_until = "
            f"EXCLUDED.active_until, updated_at = now() RETURNING {RULE_COLUMNS}", rule,
        )  # fmt: skip
        assert row is not None
        return row

    async def end_reward_rule(self, rule_id: str, now: datetime) -> Row:
        """Stop a rule from now on (claims keep referring to it, so it is never deleted)."""
        row = await self._one(
            "UPDATE reward_rules SET active_until = GREATEST(active_from + interval '1 ms', %s),"
            f" updated_at = now() WHERE rule_id = %s RETURNING {RULE_COLUMNS}", (now, rule_id),
        )  # fmt: skip
        if row is None:
            raise StoreError(404, "reward_rule_not_found", f"no reward rule {rule_id!r}")
        return row

    async def claim(self, rule_id: str, user_id: str, event_reference: str | None,
                    at: datetime) -> ClaimOutcome:  # fmt: skip
        rule = await self.reward_rule(rule_id)
        if rule is None:
            raise StoreError(404, "reward_rule_not_found", f"no reward rule {rule_id!r}")
        kind: RewardKind = rule["kind"]
        period: Period = rule["period"]
        reference = claim_reference(kind, period, at, event_reference)
        event_id = reward_grant_event_id(rule_id, user_id, reference)
        start = period_start(period, at)
        async with self.pool.connection() as conn, conn.transaction():
            cursor = conn.cursor(row_factory=dict_row)
            # A claim that exists is the answer, whatever happened to the rule since.
            await cursor.execute(
                "INSERT INTO reward_claims (rule_id, user_id, reference, period_start, "
                "amount_micro, event_id, claimed_at) VALUES (%s, %s, %s, %s, %s, %s, %s) "
                "ON CONFLICT (rule_id, user_id, reference) DO NOTHING RETURNING *",
                (rule_id, user_id, reference, start, rule["amount_micro"], event_id, at),
            )  # fmt: skip
            claim = await cursor.fetchone()
            if claim is None:
                await cursor.execute("SELECT * FROM reward_claims WHERE rule_id = %s AND "
                                     "user_id = %s AND reference = %s",
                                     (rule_id, user_id, reference))  # fmt: skip
                existing = await cursor.fetchone()
                assert existing is not None
                return ClaimOutcome(existing, granted=False)
            if not is_active(at, rule["active_from"], rule["active_until"]):
                raise StoreError(409, "reward_inactive", f"reward rule {rule_id!r} is not "
                                 "active now")  # fmt: skip
            await cursor.execute(
                "INSERT INTO reward_counters (rule_id, user_id, period_start, claimed) VALUES "
                "(%s, %s, %s, 1) ON CONFLICT (rule_id, user_id, period_start) DO UPDATE SET "
                "claimed = reward_counters.claimed + 1 WHERE reward_counters.claimed < %s "
                "RETURNING claimed", (rule_id, user_id, start, rule["cap_per_period"]),
            )  # fmt: skip
            if await cursor.fetchone() is None:
                # Leaving the block with an exception rolls the claim row back too.
                cap = rule["cap_per_period"]
                raise StoreError(409, "reward_cap_reached", f"reward {rule_id!r} was claimed "
                                 f"{cap} time(s) this {period} already")  # fmt: skip
            grant = Grant(event_id=event_id, user_id=user_id, kind="reward",
                          amount_micro=rule["amount_micro"], reference=f"{rule_id}:{reference}",
                          note=rule["description"] or None, occurred_at_ms=to_ms(at),
                          producer=self.settings.store.producer_name)  # fmt: skip
            await self._enqueue_grant(conn, grant)
            return ClaimOutcome(claim, granted=True)

    # -- price rules -----------------------------------------------------------------------

    async def price_rule_versions(self) -> list[Row]:
        return await self._all(
            "SELECT rule_id, version, effective_from, input_micro, cached_input_micro, "
            "output_micro, reasoning_micro, minimum_micro, rounding, created_at "
            "FROM price_rules ORDER BY rule_id, version")  # fmt: skip

    async def add_price_rule_version(self, rule_id: str, fields: Row, file_rules: list[Row],
                                     now: datetime) -> Row:  # fmt: skip
        """Append the next version of ``rule_id``; it applies to calls from effective_from.

        The new version is checked the way the proxy will read it (merged with the YAML
        file), so a version the proxy would refuse is never stored."""
        if fields["effective_from"] < now - timedelta(seconds=5):
            raise StoreError(400, "effective_in_past", "effective_from is in the past: a new "
                             "version may not change the price of calls already made")  # fmt: skip
        async with self.pool.connection() as conn, conn.transaction():
            # One writer per rule at a time, so versions stay gap-free.
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext('price_rule:' || %s))",
                               (rule_id,))  # fmt: skip
            cursor = await conn.execute(TABLE_QUERY)
            rows = await cursor.fetchall()
            file_versions = [v.get("version") for r in file_rules if r.get("id") == rule_id
                             for v in r.get("versions", []) if isinstance(v, dict)]  # fmt: skip
            table_versions = [row[1] for row in rows if row[0] == rule_id]
            known = [v for v in [*file_versions, *table_versions] if isinstance(v, int)]
            version = max(known, default=0) + 1
            new_row = (rule_id, version, fields["effective_from"], fields["input_micro"],
                       fields.get("cached_input_micro"), fields["output_micro"],
                       fields.get("reasoning_micro"), fields.get("minimum_micro", 0),
                       fields.get("rounding", "ceil"))  # fmt: skip
            try:
                merge(file_rules, table_rows_to_rules([*rows, new_row]))
            except CreditLedgerError as exc:
                raise StoreError(400, "invalid_price_rule", str(exc)) from exc
            cursor2 = conn.cursor(row_factory=dict_row)
            await cursor2.execute(
                "INSERT INTO price_rules (rule_id, version, effective_from, input_micro, "
                "cached_input_micro, output_micro, reasoning_micro, minimum_micro, rounding) "
                "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s) RETURNING rule_id, version, "
                "effective_from, input_micro, cached_input_micro, output_micro, "
                "reasoning_micro, minimum_micro, rounding, created_at", new_row,
            )  # fmt: skip
            row: Row | None = await cursor2.fetchone()
            assert row is not None
            return row


def utc_now() -> datetime:
    return datetime.now(UTC)


def decimal_text(value: Decimal | None) -> str | None:
    return None if value is None else format(value.normalize(), "f")
