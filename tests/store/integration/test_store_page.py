"""The store page in a real headless Chromium (Debian's /usr/bin/chromium, via Playwright):
load, switch periods, view more history, buy a pack and see the balance change once the
ledger has folded the grant. A screenshot is kept in tests/artifacts/."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from openai.types.chat import ChatCompletionMessageParam

from kernel.db import connect
from kernel.settings import PROJECT_ROOT
from testbed.ledger import WorkerGroup
from testbed.proxy import wait_for
from testbed.store import StoreWorld

CHROMIUM = os.environ.get("CREDITLEDGER_CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = PROJECT_ROOT / "tests" / "artifacts"
PROMPT: list[ChatCompletionMessageParam] = [{"role": "user", "content": "count to five"}]
CALLS = 12


@pytest.fixture
def world(ledger_store_world: StoreWorld) -> StoreWorld:
    return ledger_store_world


def entries(world: StoreWorld, user: str) -> int:
    with connect(world.env_settings()) as conn:
        row = conn.execute("SELECT count(*) FROM ledger_entries WHERE user_id = %s",
                           (user,)).fetchone()  # fmt: skip
    return int(row[0]) if row else 0


def test_store_page_in_chromium(world: StoreWorld, unique: str) -> None:
    from playwright.sync_api import expect, sync_playwright

    assert shutil.which(CHROMIUM) or Path(CHROMIUM).exists(), (
        f"{CHROMIUM} is missing: ./dev test installs Debian's chromium package "
        "(apt-get install chromium), or set CREDITLEDGER_CHROMIUM"
    )
    user = f"{unique}-shopper"
    workers = WorkerGroup(unique, world.env_settings())
    workers.start("w1")
    try:
        world.start_store()
        world.start_upstream()  # a store world starts no model of its own
        world.start_proxy()
        world.start_relay()
        world.start_process("project-postgres", "project", "postgres")
        world.start_process("project-redis", "project", "redis")
        token = world.token(user)
        assert world.call("POST", "/rewards/signup-bonus/claim", token=token)[0] == 201
        wait_for("the bonus in Redis", lambda: world.call("GET", "/balance", token=token)[1][
            "balance_micro"] == 5_000_000, 240, world)  # fmt: skip
        client = world.client(user)
        for _ in range(CALLS):
            client.chat.completions.create(model="chat", messages=PROMPT)
        client.close()
        wait_for("the charges in Postgres", lambda: entries(world, user) == CALLS + 1, 120, world)
        wait_for("the charges in Redis", lambda: world.call("GET", "/balance", token=token)[1][
            "seq"] == CALLS + 1, 60, world)  # fmt: skip

        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
                "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update",
                "--disable-sync"])  # fmt: skip
            page = browser.new_page(viewport={"width": 1100, "height": 1400})
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            response = page.goto(f"{world.store_url}/#token={token}")
            assert response is not None
            headers = response.headers
            assert "frame-ancestors 'none'" in headers["content-security-policy"]
            assert "script-src 'self'" in headers["content-security-policy"]
            assert headers["referrer-policy"] == "no-referrer"
            expect(page.locator("body")).to_have_attribute("data-ready", "1", timeout=15000)
            # The token left the address bar (and the history entry) once it was read.
            assert page.evaluate("location.hash") == ""
            assert token not in page.evaluate("location.href")
            one_call = 10 * 6 + 20 * 5
            balance_micro = 5_000_000 - CALLS * one_call
            expect(page.locator("#balance")).to_have_text("4.99808")  # 5 - 12 x 0.00016
            assert balance_micro == 4_998_080
            expect(page.locator("#who")).to_have_text(user)
            # Consumption: the period switch redraws totals and chart.
            expect(page.locator("#totals")).to_contain_text(f"{CALLS}calls")
            for period, bars in [("7d", 7), ("30d", 30), ("24h", 24)]:
                page.click(f"#periods button[data-period='{period}']")
                expect(page.locator("#totals")).to_have_attribute("data-period", period)
                expect(page.locator("#chart")).to_have_attribute("data-bars", str(bars))
            page.click("#metrics button[data-metric='tokens']")
            expect(page.locator("#models")).to_contain_text("chat")
            # History: 10 rows, then "view more" shows the rest.
            expect(page.locator("#history tr")).to_have_count(10)
            page.click("#more")
            expect(page.locator("#history tr")).to_have_count(CALLS + 1)
            expect(page.locator("#more")).to_be_hidden()
            # Buy the starter pack: order, simulated payment, grant, ledger, new balance.
            expect(page.locator(".pack s")).to_have_count(2)  # two discounted packs
            page.click("button[data-product='starter']")
            expect(page.locator("#notice")).to_contain_text("Bought 10 credits", timeout=120000)
            expect(page.locator("#balance")).to_have_text("14.99808")
            expect(page.locator("#history tr").first).to_contain_text("purchase")
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "store_page.png"), full_page=True)
            browser.close()
        assert errors == []
    finally:
        workers.cleanup()
