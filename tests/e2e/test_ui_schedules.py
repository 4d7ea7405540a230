"""The web UI's Schedules page in a real browser (Debian's Chromium through Playwright) against `aetr serve`.

The server's schedules run on a fast clock (AETR_TEST_SCHEDULE_CLOCK: a schedule minute per real second), so a
minute-by-minute schedule has runs to show within seconds.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator

import aiohttp
import pytest
import pytest_asyncio
from playwright.async_api import Page, expect

from tests.e2e.conftest import LOGS
from tests.e2e.harness import AetrServer, Api, Launcher
from tests.e2e.ui_helpers import (
    EXPECT_TIMEOUT_MS,
    NARROW,
    needs_browser,
    publish,
    screenshot_path,
)

pytestmark = pytest.mark.asyncio(loop_scope="module")
expect.set_options(timeout=EXPECT_TIMEOUT_MS)
RUNS_SHOWN = 3  # runs the minute-by-minute schedule starts before the page is looked at
WAIT_S = 30.0


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def processes(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Launcher]:
    started = Launcher(tmp_path_factory.mktemp("ui-schedules"))
    try:
        yield started
    finally:
        await started.stop_all()


@pytest.fixture(autouse=True)
def show_logs(request: pytest.FixtureRequest, processes: Launcher) -> None:
    request.node.stash[LOGS] = processes.log_paths


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def server(processes: Launcher) -> AetrServer:
    env = {"AETR_TEST_SCHEDULE_CLOCK": f"{time.time():.3f}*60", "AETR_SCHEDULE_TICK_S": "0.1"}
    return await processes.serve(f"sqlite:///{processes.workdir / 'aetr.db'}", env=env)



@needs_browser
async def test_the_schedules_page_lists_next_times_links_last_runs_and_pauses_and_resumes(
        page: Page, server: AetrServer) -> None:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
        api = Api(http, server.url)
        await api.put_step({"name": "report", "kind": "wait", "signal": True, "timeout_s": 3600})
        for name, body in (("every-minute", {"cron": "* * * * *", "input": {"scope": "recent"}}),
                           ("nightly-report", {"cron": "30 2 * * *", "timezone": "Europe/Paris"}),
                           ("weekly-cleanup", {"cron": "0 4 * * 0", "enabled": False})):
            status, answer = await api.call("PUT", f"/api/v1/schedules/{name}", {"step": "report", **body})
            assert status == 201, answer
        deadline = time.monotonic() + WAIT_S
        while len((await api.call("GET", "/api/v1/schedules/every-minute"))[1]["last_runs"]) < RUNS_SHOWN:
            assert time.monotonic() < deadline, f"every-minute did not start {RUNS_SHOWN} runs in {WAIT_S} s"
            await asyncio.sleep(0.2)

        await page.goto(f"{server.url}/#/schedules")
        await expect(page.get_by_role("heading", level=1)).to_have_text("Schedules")
        minutely = page.locator("tr[data-schedule='every-minute']")
        await minutely.get_by_role("button", name="Pause every-minute").click()
        await expect(minutely.get_by_role("button", name="Resume every-minute")).to_be_visible()
        await expect(minutely).to_contain_text("paused")
        _, paused = await api.call("GET", "/api/v1/schedules/every-minute")
        assert paused["enabled"] is False and paused["next_run_at"] is None, paused
        runs = paused["last_runs"]
        await expect(minutely.locator("a.last-run")).to_have_count(len(runs))

        weekly = page.locator("tr[data-schedule='weekly-cleanup']")
        await expect(weekly).to_contain_text("paused")
        await weekly.get_by_role("button", name="Resume weekly-cleanup").click()
        await expect(weekly.get_by_role("button", name="Pause weekly-cleanup")).to_be_visible()
        _, resumed = await api.call("GET", "/api/v1/schedules/weekly-cleanup")
        assert resumed["enabled"] is True and resumed["next_run_at"] is not None, resumed
        await weekly.get_by_role("button", name="Pause weekly-cleanup").click()
        await expect(weekly.get_by_role("button", name="Resume weekly-cleanup")).to_be_visible()

        nightly = page.locator("tr[data-schedule='nightly-report']")
        await expect(nightly).to_contain_text("30 2 * * *")
        await expect(nightly).to_contain_text("Europe/Paris")
        await expect(nightly).to_contain_text("none yet")
        await page.evaluate("document.getElementById('toasts').replaceChildren()")
        await page.screenshot(path=screenshot_path("schedules"), animations="disabled")
        publish("schedules")

        await page.set_viewport_size(NARROW)  # a phone: every row stays readable, the buttons reachable
        await expect(page.get_by_role("navigation", name="Main").get_by_role("link", name="Schedules")).to_be_visible()
        await expect(page.get_by_role("button", name="Keyboard shortcuts")).to_be_in_viewport(ratio=1)
        resume = weekly.get_by_role("button", name="Resume weekly-cleanup")
        # Scrolled to the middle of the window: "if needed" leaves a button that a fraction of a pixel of the
        # window's bottom edge hides where it is, which is not what this looks for.
        await resume.evaluate("button => button.scrollIntoView({block: 'center'})")
        await expect(resume).to_be_in_viewport(ratio=1)  # not cut off at the window's right edge
        await page.screenshot(path=screenshot_path("schedules-narrow"), animations="disabled")

        await minutely.get_by_role("link", name=re.compile(f"Run {runs[0]['id']}")).click()
        await expect(page).to_have_url(re.compile(f"#/runs/{runs[0]['id']}$"))
        await expect(page.get_by_role("heading", level=1)).to_contain_text("report")
