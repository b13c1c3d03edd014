"""The credit store's Postgres side: products, orders, reward rules and claims, price rules.

Every change that earns credits writes its ``credit.grant.requested`` event into
the outbox (migration 0002) in the same transaction as the state change, with an
event id derived from the order or the claim, so no crash can lose a grant or
make two:

- orders change only through the pure transitions of :mod:`store.orders`, on the
  order as loaded under its row lock: a payment moves it to ``paid`` (idempotent
  by payment reference; the lock serialises concurrent callbacks);
- fulfilment then writes the grant and moves the order to ``fulfilled`` in one
  transaction. A crash between the two leaves a ``paid`` order, which the
  fulfiller sweep (:meth:`StoreRepository.fulfil_pending`) finishes; the
  outbox's unique event id makes a second attempt add nothing;
- a reward claim inserts its row (unique by rule, user, reference), bumps the
  per-period counter (read under its row lock; :func:`store.rewards.check_claim`
  decides) and writes the grant, all in one transaction.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import psycopg
from psycopg import AsyncCursor
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

from contracts.cloudevents import current_trace, event_headers
from contracts.commands import Grant
from contracts.records import GRANT_TOPIC, command_to_record
from kernel.db import open_pool
from kernel.errors import CreditLedgerError, StoreConflict, StoreInvalid, StoreNotFound
from kernel.settings import Settings
from outbox.enqueue import enqueue_async
from pricing.source import TABLE_QUERY, merge, table_rows_to_rules
from store import orders as transition
from store.orders import ORDER_FIELDS, Order, Payment, PayOutcome
from store.rewards import RULE_FIELDS, RewardRule, check_claim, plan_claim
from streams.codec import AvroCodec

Row = dict[str, Any]

ORDER_COLUMNS = ", ".join(ORDER_FIELDS)
PRODUCT_COLUMNS = (
    "product_id, name, credits_micro, original_price_minor, price_minor, currency, "
    "active_from, active_until, sort_order"
)
RULE_COLUMNS = ", ".join(RULE_FIELDS)


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
        headers = event_headers(grant.event_id, GRANT_TOPIC, grant.producer,
                                grant.occurred_at_ms, current_trace.get())  # fmt: skip
        await enqueue_async(conn, grant.event_id, GRANT_TOPIC, grant.user_id.encode(), value,
                            headers=headers)  # fmt: skip

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

    # -- orders: load under the row lock, one pure transition (store.orders), save --------

    async def create_order(self, user_id: str, product_id: str, now: datetime) -> Order:
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
            raise StoreNotFound("product_not_found", f"no product {product_id!r} on sale now")
        return Order.from_row(row)

    async def order(self, order_id: str) -> Order | None:
        row = await self._one(f"SELECT {ORDER_COLUMNS} FROM orders WHERE order_id = %s",
                              (order_id,))  # fmt: skip
        return None if row is None else Order.from_row(row)

    async def orders(self, user_id: str, limit: int) -> list[Order]:
        rows = await self._all(f"SELECT {ORDER_COLUMNS} FROM orders WHERE user_id = %s "
                               "ORDER BY created_at DESC, order_id DESC LIMIT %s",
                               (user_id, limit))  # fmt: skip
        return [Order.from_row(row) for row in rows]

    @staticmethod
    async def _locked(cursor: AsyncCursor[Row], order_id: str, *,
                      paid_only: bool = False) -> Order | None:  # fmt: skip
        """The order under its row lock (``paid_only``: a paid order nobody else holds)."""
        where = "AND status = 'paid' FOR UPDATE SKIP LOCKED" if paid_only else "FOR UPDATE"
        await cursor.execute(f"SELECT {ORDER_COLUMNS} FROM orders WHERE order_id = %s {where}",
                             (order_id,))  # fmt: skip
        row = await cursor.fetchone()
        return None if row is None else Order.from_row(row)

    async def _existing(self, cursor: AsyncCursor[Row], order_id: str) -> Order:
        """The order under its row lock; StoreNotFound when there is none."""
        order = await self._locked(cursor, order_id)
        if order is None:
            raise StoreNotFound("order_not_found", f"no order {order_id!r}")
        return order

    @staticmethod
    async def _save(cursor: AsyncCursor[Row], order: Order) -> None:
        """What a transition may change (the rest of an order never changes)."""
        await cursor.execute(
            "UPDATE orders SET status = %s, payment_reference = %s, grant_event_id = %s, "
            "paid_at = %s, fulfilled_at = %s, cancelled_at = %s WHERE order_id = %s",
            (order.status, order.payment_reference, order.grant_event_id, order.paid_at,
             order.fulfilled_at, order.cancelled_at, order.order_id),
        )  # fmt: skip

    async def cancel_order(self, user_id: str, order_id: str, now: datetime) -> Order:
        async with self.pool.connection() as conn, conn.transaction():
            cursor = conn.cursor(row_factory=dict_row)
            order = await self._existing(cursor, order_id)
            cancelled = transition.cancel(order, user_id, now)
            await self._save(cursor, cancelled)
            return cancelled

    async def record_payment(self, order_id: str, payment: Payment,
                             now: datetime) -> PayOutcome:  # fmt: skip
        """Mark the order paid, once: a repeated callback finds it paid by the same payment.
        The row lock serialises concurrent callbacks of one order; the unique payment
        reference refuses one payment for two orders."""
        async with self.pool.connection() as conn, conn.transaction():
            cursor = conn.cursor(row_factory=dict_row)
            order = await self._existing(cursor, order_id)
            outcome = transition.pay(order, payment, now)
            if outcome.newly_paid:
                try:
                    await self._save(cursor, outcome.order)
                except psycopg.errors.UniqueViolation as exc:
                    raise StoreConflict("payment_reused", f"payment {payment.reference!r} "
                                        "already paid another order") from exc  # fmt: skip
            return outcome

    async def fulfil(self, order_id: str) -> bool:
        """Write the paid order's grant to the outbox and mark it fulfilled, in one
        transaction; False if the order is not paid (or another fulfiller holds it)."""
        async with self.pool.connection() as conn, conn.transaction():
            cursor = conn.cursor(row_factory=dict_row)
            order = await self._locked(cursor, order_id, paid_only=True)
            if order is None:
                return False
            fulfilled, grant = transition.fulfil(order, self.settings.store.producer_name,
                                             utc_now())  # fmt: skip
            await self._enqueue_grant(conn, grant)
            await self._save(cursor, fulfilled)
            return True

    async def fulfil_pending(self, limit: int = 100) -> int:
        """Fulfil paid orders left behind (a crash after payment); how many were done."""
        rows = await self._all("SELECT order_id FROM orders WHERE status = 'paid' "
                               "ORDER BY paid_at LIMIT %s", (limit,))  # fmt: skip
        done = 0
        for row in rows:
            done += await self.fulfil(row["order_id"])
        return done

    async def expire_orders(self, now: datetime, limit: int = 1000) -> int:
        """Expire created orders past their time (up to ``limit`` per sweep)."""
        async with self.pool.connection() as conn, conn.transaction():
            cursor = conn.cursor(row_factory=dict_row)
            await cursor.execute(
                f"SELECT {ORDER_COLUMNS} FROM orders WHERE status = 'created' AND "
                "expires_at <= %s ORDER BY expires_at LIMIT %s FOR UPDATE SKIP LOCKED",
                (now, limit))  # fmt: skip
            loaded = [Order.from_row(row) for row in await cursor.fetchall()]
            expired = [o.order_id for o in loaded if transition.expire(o, now) is not None]
            if expired:
                await cursor.execute("UPDATE orders SET status = 'expired' WHERE order_id = "
                                     "ANY(%s)", (expired,))  # fmt: skip
            return len(expired)

    # -- rewards ---------------------------------------------------------------------------

    async def reward_rules(self) -> list[Row]:
        return await self._all(f"SELECT {RULE_COLUMNS} FROM reward_rules ORDER BY rule_id")

    async def reward_rule(self, rule_id: str) -> RewardRule:
        row = await self._one(f"SELECT {RULE_COLUMNS} FROM reward_rules WHERE rule_id = %s",
                              (rule_id,))  # fmt: skip
        if row is None:
            raise StoreNotFound("reward_rule_not_found", f"no reward rule {rule_id!r}")
        return RewardRule.from_row(row)

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
            raise StoreNotFound("reward_rule_not_found", f"no reward rule {rule_id!r}")
        return row

    async def claim(self, rule: RewardRule, user_id: str, event_reference: str | None,
                    at: datetime) -> ClaimOutcome:  # fmt: skip
        """Claim ``rule`` for ``user_id``: the claim, its counter and its grant in one
        transaction; a claim made before is the answer, whatever happened to the rule."""
        plan = plan_claim(rule, user_id, event_reference, at, self.settings.store.producer_name)
        key = (rule.rule_id, user_id, plan.period_start)
        async with self.pool.connection() as conn, conn.transaction():
            cursor = conn.cursor(row_factory=dict_row)
            await cursor.execute(
                "INSERT INTO reward_claims (rule_id, user_id, reference, period_start, "
                "amount_micro, event_id, claimed_at) VALUES (%s, %s, %s, %s, %s, %s, %s) "
                "ON CONFLICT (rule_id, user_id, reference) DO NOTHING RETURNING *",
                (rule.rule_id, user_id, plan.reference, plan.period_start, rule.amount_micro,
                 plan.grant.event_id, at),
            )  # fmt: skip
            claim = await cursor.fetchone()
            if claim is None:
                await cursor.execute("SELECT * FROM reward_claims WHERE rule_id = %s AND "
                                     "user_id = %s AND reference = %s",
                                     (rule.rule_id, user_id, plan.reference))  # fmt: skip
                existing = await cursor.fetchone()
                assert existing is not None, "a claim that conflicts exists"
                return ClaimOutcome(existing, granted=False)
            # The counter under its row lock: concurrent claims of one user and period
            # take turns, so the cap holds. Raising rolls the claim row back too.
            await cursor.execute("INSERT INTO reward_counters (rule_id, user_id, period_start, "
                                 "claimed) VALUES (%s, %s, %s, 0) ON CONFLICT DO NOTHING",
                                 key)  # fmt: skip
            await cursor.execute("SELECT claimed FROM reward_counters WHERE rule_id = %s AND "
                                 "user_id = %s AND period_start = %s FOR UPDATE", key)  # fmt: skip
            counter = await cursor.fetchone()
            assert counter is not None, "the counter row was just ensured"
            check_claim(rule, at, counter["claimed"])
            await cursor.execute("UPDATE reward_counters SET claimed = claimed + 1 WHERE "
                                 "rule_id = %s AND user_id = %s AND period_start = %s",
                                 key)  # fmt: skip
            await self._enqueue_grant(conn, plan.grant)
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
            raise StoreInvalid("effective_in_past", "effective_from is in the past: a new "
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
                raise StoreInvalid("invalid_price_rule", str(exc)) from exc
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
