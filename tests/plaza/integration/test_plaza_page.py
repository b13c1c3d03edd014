"""The plaza page in a real headless Chromium (Debian's /usr/bin/chromium, via Playwright):
a debounced search counted at the server, publishing with and without a tag, like,
unlike and import, a reply three levels deep, deleting a comment that has replies, and
HTML in a title and a comment shown as text. A screenshot is kept in tests/artifacts/."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kernel.settings import PROJECT_ROOT, Settings
from testbed.plaza import PlazaWorld, plaza_world
from testbed.topics import ScratchTopics

CHROMIUM = os.environ.get("CREDITLEDGER_CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = PROJECT_ROOT / "tests" / "artifacts"
XSS = "<script>window.pwned = 1</script><img src=x onerror=window.pwned=1>"


@pytest.fixture
def world(stack_settings: Settings, scratch: ScratchTopics, unique: str) -> Iterator[PlazaWorld]:
    with plaza_world(stack_settings, scratch, unique) as world:
        yield world


def open_browser(p: Any) -> Any:
    assert shutil.which(CHROMIUM) or Path(CHROMIUM).exists(), (
        f"{CHROMIUM} is missing: ./dev test installs Debian's chromium package "
        "(apt-get install chromium), or set CREDITLEDGER_CHROMIUM"
    )
    return p.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
        "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update",
        "--disable-sync"])  # fmt: skip


def test_plaza_page_in_chromium(world: PlazaWorld, unique: str) -> None:
    from playwright.sync_api import expect, sync_playwright

    author, reader = f"{unique}-author", f"{unique}-reader"
    target = world.publish(world.token(author), f"Marathon {XSS}", summary="Sixteen weeks",
                           tags=["running"])  # fmt: skip
    world.publish(world.token(author), "学习计划 for Chinese", tags=["学习"])
    with sync_playwright() as p:
        browser = open_browser(p)
        page = browser.new_page(viewport={"width": 1100, "height": 1300})
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        token = world.token(reader)
        response = page.goto(f"{world.plaza_url}/#token={token}")
        assert response is not None
        assert "script-src 'self'" in response.headers["content-security-policy"]
        expect(page.locator("body")).to_have_attribute("data-ready", "true", timeout=15000)
        assert page.evaluate("location.hash") == ""  # the token left the address bar
        expect(page.locator("#store-link")).to_have_attribute(
            "href", f"{world.store_url}/#token={token}"
        )
        expect(page.locator(".plan")).to_have_count(2)
        # HTML in a title is text: shown as typed, never run.
        expect(page.locator(f".plan[data-plan-id='{target['plan_id']}'] h3")).to_have_text(
            f"Marathon {XSS}")  # fmt: skip
        expect(page.locator("#tags .chip")).to_have_count(3)  # all, running, 学习

        # Search: five characters typed quickly are one request, 300 ms after the last.
        before = world.requests_counted("/plaza/plans")
        page.locator("#search").press_sequentially("marat", delay=40)
        expect(page.locator(".plan")).to_have_count(1, timeout=5000)
        time.sleep(0.6)
        assert world.requests_counted("/plaza/plans") - before == 1
        page.locator("#search").fill("")
        page.locator("#search").press_sequentially("学习", delay=40)
        expect(page.locator(".plan h3")).to_have_text(["学习计划 for Chinese"])
        page.locator("#search").fill("")
        page.locator("#search").dispatch_event("input")
        expect(page.locator(".plan")).to_have_count(2)

        # Like, unlike, import: the counts follow, import once.
        card = page.locator(f".plan[data-plan-id='{target['plan_id']}']")
        card.locator("button.like").click()
        expect(card.locator("button.like")).to_have_text("♥ Liked 1")
        card.locator("button.like").click()
        expect(card.locator("button.like")).to_have_text("♡ Like 0")
        card.locator("button.like").click()
        expect(card.locator("button.like")).to_have_text("♥ Liked 1")
        card.locator("button.import").click()
        expect(card.locator("button.import")).to_have_text("Imported 1")
        expect(card.locator("button.import")).to_be_disabled()
        expect(page.locator("#notice")).to_contain_text("Imported into your plans")
        seen = world.plaza("GET", f"/plans/{target['plan_id']}", token=world.token(reader))[1]
        assert (seen["like_count"], seen["import_count"], seen["liked"], seen["imported"]) == (
            1, 1, True, True)  # fmt: skip

        # Publish without a tag: the form offers the default and the plan gets it.
        page.click("#new-plan")
        expect(page.locator("#tag-hint")).to_contain_text('tagged "general"')
        page.fill("#publish [name=title]", "Untagged plan")
        page.fill("#steps [name=step-title]", "First step")
        page.click("#publish button[type=submit]")
        expect(page.locator("#detail h2")).to_have_text("Untagged plan")
        expect(page.locator("#detail .tag")).to_have_text(["general"])
        # And with tags.
        page.click("#back")
        page.click("#new-plan")
        page.fill("#publish [name=title]", "Tagged plan")
        page.fill("#steps [name=step-title]", "Stretch")
        page.click("#add-step")
        page.locator("#steps [name=step-title]").nth(1).fill("Run 5 km")
        page.locator("#steps [name=step-minutes]").nth(1).fill("30")
        page.fill("#tag-input", "Running, Morning")
        page.click("#publish button[type=submit]")
        expect(page.locator("#detail .tag")).to_have_text(["running", "morning"])
        expect(page.locator("#detail .steps li")).to_have_count(2)
        expect(page.locator("#detail .steps li").nth(1)).to_contain_text("30 min")

        # The thread: a comment with HTML, a reply three levels deep, delete one with replies.
        page.fill("#comment-form textarea", XSS)
        page.click("#comment-form button")
        top = page.locator(".comment").first
        expect(top.locator(".body")).to_have_text(XSS)
        parent = top
        for depth in (1, 2, 3):
            parent.locator("> .actions .reply-button").click()
            parent.locator("form.reply textarea").fill(f"reply at depth {depth}")
            parent.locator("form.reply button").click()
            parent = page.locator(f".comment[data-depth='{depth}']")
            expect(parent.locator(".body")).to_have_text(f"reply at depth {depth}")
        expect(page.locator(".comment")).to_have_count(4)
        top.locator("> .actions .delete-button").click()
        first = page.locator(".comment").first
        expect(first).to_have_class("comment deleted")
        expect(first.locator(".body")).to_have_text("[deleted]")
        expect(page.locator(".comment")).to_have_count(4)  # the replies stay
        # After a reload of the plan the tree reads the same from the server.
        page.click("#back")
        page.get_by_role("heading", name="Tagged plan", exact=True).locator("a").click()
        expect(page.locator(".comment")).to_have_count(4)
        expect(page.locator(".comment").nth(3)).to_have_attribute("data-depth", "3")
        expect(page.locator(".comment").first.locator(".body")).to_have_text("[deleted]")
        assert page.evaluate("window.pwned") is None
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "plaza_page.png"), full_page=True)
        browser.close()
    assert errors == []
