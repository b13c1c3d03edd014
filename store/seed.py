"""The store's starting catalogue: three credit packs and three reward rules.

``creditledger store seed`` (and the demo) insert them when missing and never
overwrite what an admin has changed since.
"""

from __future__ import annotations

from typing import Any

from kernel.db import connect
from kernel.settings import Settings

CREDIT = 1_000_000  # micro-credits

PRODUCTS: list[dict[str, Any]] = [
    {"product_id": "starter", "name": "Starter pack", "credits_micro": 10 * CREDIT,
     "original_price_minor": 500, "price_minor": 500, "currency": "USD", "sort_order": 1},
    {"product_id": "standard", "name": "Standard pack", "credits_micro": 50 * CREDIT,
     "original_price_minor": 2500, "price_minor": 2000, "currency": "USD", "sort_order": 2},
    {"product_id": "pro", "name": "Pro pack", "credits_micro": 200 * CREDIT,
     "original_price_minor": 10000, "price_minor": 7000, "currency": "USD", "sort_order": 3},
]  # fmt: skip

REWARD_RULES: list[dict[str, Any]] = [
    {"rule_id": "signup-bonus", "kind": "signup", "description": "Welcome bonus",
     "amount_micro": 5 * CREDIT, "cap_per_period": 1, "period": "lifetime",
     "trigger_event": None},
    {"rule_id": "daily-checkin", "kind": "checkin", "description": "Daily check-in",
     "amount_micro": CREDIT // 2, "cap_per_period": 1, "period": "day", "trigger_event": None},
    # The plan plaza's: the author earns when another user imports their plan
    # (store.event_rewards claims it; importing your own plan earns nothing).
    {"rule_id": "plaza-plan-imported", "kind": "event",
     "description": "Someone imported a plan you shared on the plan plaza",
     "amount_micro": CREDIT, "cap_per_period": 5, "period": "day",
     "trigger_event": "plan.imported"},
]  # fmt: skip


def seed(settings: Settings, *, dsn: str | None = None) -> tuple[int, int]:
    """Insert the missing products and reward rules; how many of each were added."""
    with connect(settings, dsn=dsn) as conn, conn.transaction():
        products = 0
        for product in PRODUCTS:
            products += conn.execute(
                "INSERT INTO products (product_id, name, credits_micro, original_price_minor, "
                "price_minor, currency, sort_order) VALUES (%(product_id)s, %(name)s, "
                "%(credits_micro)s, %(original_price_minor)s, %(price_minor)s, %(currency)s, "
                "%(sort_order)s) ON CONFLICT (product_id) DO NOTHING", product,
            ).rowcount  # fmt: skip
        rules = 0
        for rule in REWARD_RULES:
            rules += conn.execute(
                "INSERT INTO reward_rules (rule_id, kind, description, amount_micro, "
                "cap_per_period, period, trigger_event) VALUES (%(rule_id)s, %(kind)s, "
                "%(description)s, %(amount_micro)s, %(cap_per_period)s, %(period)s, "
                "%(trigger_event)s) ON CONFLICT (rule_id) DO NOTHING", rule,
            ).rowcount  # fmt: skip
    return products, rules
