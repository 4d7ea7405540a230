"""The run page shows each try to announce the run's end, in a real browser against the real `aetr serve`."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from playwright.async_api import Page, async_playwright, expect

from tests.e2e.harness import AetrServer, Api, Launcher
from tests.e2e.ui_helpers import CHROMIUM, CHROMIUM_ARGS, DESKTOP, EXPECT_TIMEOUT_MS, needs_browser, require_chromium

expect.set_options(timeout=EXPECT_TIMEOUT_MS)


@pytest.fixture
async def sqlite_aetr(launcher: Launcher, tmp_path: Path) -> AetrServer:
    """`aetr serve` on a fresh SQLite file (the page is the same on every backend), with short notification waits."""
    # A lease long enough that a try the receiver holds is not timed out (a third of the lease at most).
    return await launcher.serve(f"sqlite:///{tmp_path / 'aetr.db'}",
                                env={"AETR_NOTIFY_BACKOFF_S": "0.5", "AETR_LEASE_S": "30"})


@pytest.fixture
async def page() -> AsyncIterator[Page]:
    """A tab of Debian's Chromium; the test fails if the page's scripts throw."""
    require_chromium()
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=False)
        context = await browser.new_context(viewport=DESKTOP, locale="en-GB", timezone_id="UTC")
        tab = await context.new_page()
        errors: list[str] = []
        tab.on("pageerror", lambda error: errors.append(str(error)))
        try:
            yield tab
        finally:
            await browser.close()
        assert not errors, f"the page threw: {errors}"


@needs_browser
async def test_the_run_page_shows_each_try_to_announce_the_runs_end(
        page: Page, sqlite_aetr: AetrServer, http: aiohttp.ClientSession) -> None:
    tries = 0
    page_settled = asyncio.Event()

    async def hook(request: web.Request) -> web.Response:
        nonlocal tries
        tries += 1
        if tries == 1:
            # Answered only once the page has read the ended run's history and gone quiet: whatever it shows
            # of the tries after that, it read again on its own.
            await page_settled.wait()
            return web.Response(status=503)
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/hook", hook)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        url = f"http://127.0.0.1:{runner.addresses[0][1]}/hook"
        api = Api(http, sqlite_aetr.url)
        await api.put_step({"name": "quick", "kind": "wait", "seconds": 0})
        status, run = await api.call("POST", "/api/v1/runs", {"step": "quick", "notify": url})
        assert status == 201, run
        await page.goto(f"{sqlite_aetr.url}/#/runs/{run['id']}")

        history = page.locator("table.events tbody")
        queued = history.locator("tr").filter(has_text=re.compile(r"notification to .* · queued"))
        await expect(queued).to_have_count(1)
        await page.wait_for_load_state("networkidle")
        page_settled.set()
        refused = history.locator("tr").filter(has_text=re.compile(r"try 1 · answered HTTP 503 · to be tried again"))
        await expect(refused).to_have_count(1)
        await expect(refused).to_contain_text(f"notification to {url}")
        # The run ended before the second try: the page reads the history again for it.
        delivered = history.locator("tr").filter(has_text=re.compile(r"try 2 · answered HTTP 204 · delivered"))
        await expect(delivered).to_have_count(1)
        await expect(delivered.locator(".badge")).to_have_text("notify")
    finally:
        page_settled.set()
        await runner.cleanup()
