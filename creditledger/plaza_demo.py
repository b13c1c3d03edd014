"""Step 8 of the demo: the plan plaza, whose imports earn the plan's author credits.

Runs after the store step while the ledger worker, relay and projectors are up: starts
``creditledger plaza serve`` and ``creditledger store event-rewards``; one user publishes
a plan, another finds it by a Chinese search term and imports it, and the step times
the import until the author's reward (the seeded ``plaza-plan-imported`` rule) is
visible in the author's store balance. The plaza is left running with the store
(unless ``CREDITLEDGER_DEMO_KEEP_STORE=0``), so its printed page URL opens afterwards.
"""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

from creditledger.store_demo import call_json, user_token
from creditledger.tables import render_table
from kernel.settings import Settings
from stack.processes import wait_http
from store.seed import REWARD_RULES

# The reward of one import by another user, as seeded (store/seed.py).
REWARD_MICRO = next(
    r["amount_micro"] for r in REWARD_RULES if r["rule_id"] == "plaza-plan-imported"
)
SEARCH = "徒步"


def start_plaza(settings: Settings, env: dict[str, str], keep: bool) -> subprocess.Popen[bytes]:
    log = (settings.stack.state_dir / "demo-plaza.log").open("ab")
    return subprocess.Popen([sys.executable, "-m", "creditledger.cli", "plaza", "serve"],
                            env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=keep)  # fmt: skip


def _plan(run: str) -> dict[str, object]:
    return {
        "title": f"周末徒步 weekend hike {run}",
        "summary": "Two days on the ridge, with a night in the hut.",
        "tags": ["Outdoors", "hiking"],
        "steps": [
            {"title": "Pack", "detail": "Water, a map, a warm layer.", "duration_minutes": 30},
            {"title": "Walk to the hut", "detail": "Follow the ridge.", "duration_minutes": 300},
            {"title": "Come down", "detail": "By the valley path."},
        ],
    }


def _find(base: str, token: str, plan_id: str, deadline: float) -> int:
    """Search until the plan is listed (it is, at once: the listing reads Postgres)."""
    query = urllib.parse.urlencode({"q": SEARCH, "limit": 50})
    while True:
        found = call_json(base, "GET", f"/plans?{query}", token)["plans"]
        if any(p["plan_id"] == plan_id for p in found) or time.monotonic() > deadline:
            return len(found)
        time.sleep(0.05)


def plaza_demo(settings: Settings, plaza: subprocess.Popen[bytes], author: str, reader: str,
               run: str) -> bool:  # fmt: skip
    print("\n== 8. the plan plaza: an import by another user earns the author credits")
    base = f"http://{settings.plaza.host}:{settings.plaza.port}/plaza"
    if not wait_http(f"{base}/openapi.json", plaza, 60):
        print(f"the plaza did not start; see {Path(settings.stack.state_dir) / 'demo-plaza.log'}")
        return False
    store = f"http://{settings.store.host}:{settings.store.port}/credit-store"
    author_token, reader_token = user_token(settings, author), user_token(settings, reader)
    before = call_json(store, "GET", "/balance", author_token)["balance_micro"]
    t0 = time.monotonic()
    plan = call_json(base, "POST", "/plans", author_token, _plan(run))
    t_published = time.monotonic()
    listed = _find(base, reader_token, plan["plan_id"], t0 + 30)
    t_found = time.monotonic()
    imported = call_json(base, "POST", f"/plans/{plan['plan_id']}/import", reader_token)
    t_imported = time.monotonic()
    after, deadline = before, t_imported + 120
    while after != before + REWARD_MICRO and time.monotonic() < deadline:
        time.sleep(0.05)
        after = call_json(store, "GET", "/balance", author_token)["balance_micro"]
    t_seen = time.monotonic()
    ok = after == before + REWARD_MICRO and imported["created"] is True

    def ms(t: float, since: float = t0) -> str:
        return f"{(t - since) * 1000:.0f}"

    print(render_table(["step", "who", "result", "ms"], [
        ("publish (tags normalised)", author, f"{plan['plan_id']} {plan['tags']}",
         ms(t_published)),
        (f"search {SEARCH!r}", reader, f"found among {listed}", ms(t_found, t_published)),
        ("import (copy + plan.imported in the outbox)", reader, imported["copy"]["plan_id"],
         ms(t_imported, t_found)),
        ("reward visible in the author's balance", author, f"{before} -> {after} µcr",
         ms(t_seen, t_imported)),
    ]))  # fmt: skip
    print("  (import -> relay -> event-rewards claims the rule -> grant through the outbox ->")
    print("   ledger worker -> Redis projector -> store /balance)")
    print(f"plaza demo: {'the import earned one reward' if ok else 'MISMATCH'}")
    print(f"plaza page: {base}/#token={reader_token}")
    return ok
