"""End-to-end fixtures: the real `aetr` process on a fresh SQLite file or PostgreSQL database, and its logs."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Generator
from pathlib import Path

import aiohttp
import asyncpg
import pytest
import pytest_asyncio
from playwright.async_api import Browser, Page, async_playwright

from tests.e2e.harness import AetrServer, Launcher
from tests.e2e.ui_helpers import CHROMIUM, CHROMIUM_ARGS, DESKTOP, require_chromium

PG_ADMIN_URL = os.environ.get("AETR_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
REQUIRE_PG = os.environ.get("AETR_REQUIRE_POSTGRES") == "1"

LOGS = pytest.StashKey[list[Path]]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, pytest.TestReport,
                                                                                             pytest.TestReport]:
    """A failing test shows the output of every `aetr` process it started."""
    report = yield
    if report.failed:
        for path in item.stash.get(LOGS, []):
            if path.exists():
                report.sections.append((f"log of {path.name}", path.read_text(errors="replace")))
    return report


async def _admin(sql: str) -> None:
    conn = await asyncpg.connect(PG_ADMIN_URL, timeout=5)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """An empty database of each backend, for this test alone: a SQLite file, or a new PostgreSQL database."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'aetr.db'}"
        return
    # One database per test, not a shared one truncated in between: a killed server must find exactly
    # the state it died with, and nothing of another test.
    name = f"aetr_e2e_{uuid.uuid4().hex[:12]}"
    try:
        await _admin(f'CREATE DATABASE "{name}"')
    except (OSError, asyncpg.PostgresError) as exc:
        if REQUIRE_PG:
            pytest.fail(f"PostgreSQL is required (AETR_REQUIRE_POSTGRES=1) but not reachable at {PG_ADMIN_URL}: {exc}")
        pytest.skip(f"PostgreSQL not reachable at {PG_ADMIN_URL}: {exc}")
    try:
        yield f"{PG_ADMIN_URL.rsplit('/', 1)[0]}/{name}"
    finally:
        await _admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
async def launcher(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Launcher]:
    """Starts `aetr` processes for the test; stops all of them afterwards, even when the test failed."""
    started = Launcher(tmp_path)
    request.node.stash[LOGS] = started.log_paths
    try:
        yield started
    finally:
        await started.stop_all()


@pytest.fixture
async def aetr(launcher: Launcher, database_url: str) -> AetrServer:
    """A running `aetr serve` on each backend."""
    return await launcher.serve(database_url)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """An HTTP client session, closed after the test."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        yield session

# The web UI's browser, for the UI tests of every module (tests/e2e/ui_helpers.py has the rest).


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def chromium() -> AsyncIterator[Browser]:
    """Debian's Chromium; Playwright gives each launch a fresh temporary profile."""
    require_chromium()
    async with async_playwright() as playwright:
        # headless=False: Playwright would add its own --headless; CHROMIUM_ARGS already says --headless=new.
        browser = await playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=False)
        try:
            yield browser
        finally:
            await browser.close()


@pytest_asyncio.fixture(loop_scope="module")
async def page(chromium: Browser) -> AsyncIterator[Page]:
    """A tab in a fresh browser context (no cookies, no storage); the test fails if the page's scripts throw."""
    context = await chromium.new_context(viewport=DESKTOP, locale="en-GB", timezone_id="UTC", reduced_motion="reduce")
    tab = await context.new_page()
    errors: list[str] = []
    tab.on("pageerror", lambda error: errors.append(str(error)))
    try:
        yield tab
    finally:
        await context.close()
    assert not errors, f"the page threw: {errors}"
