"""The web UI's end-to-end tests: Debian's Chromium driven by Playwright, screenshots, and small page helpers."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from playwright.async_api import ViewportSize

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = Path(os.environ.get("AETR_CHROMIUM", "/usr/bin/chromium"))
REQUIRE_BROWSER = os.environ.get("AETR_REQUIRE_BROWSER") == "1"
ARTIFACTS = ROOT / "test-artifacts" / "ui"  # gitignored: every run's screenshots
DOCS_SCREENSHOTS = ROOT / "docs" / "screenshots"  # the current ones, refreshed with AETR_UPDATE_SCREENSHOTS=1
UPDATE_DOCS = os.environ.get("AETR_UPDATE_SCREENSHOTS") == "1"
# Debian's Chromium, headless, talking to nothing but the page under test.
CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
EXPECT_TIMEOUT_MS = 15_000  # a run of the example pipeline takes ~2 s; leave room on a loaded CI machine
DESKTOP: ViewportSize = {"width": 1280, "height": 860}
NARROW: ViewportSize = {"width": 400, "height": 860}
TALL: ViewportSize = {"width": 1280, "height": 1400}

needs_browser = pytest.mark.skipif(
    not CHROMIUM.exists() and not REQUIRE_BROWSER,
    reason=f"{CHROMIUM} is not installed (apt-get install chromium); set AETR_REQUIRE_BROWSER=1 to fail instead")


def require_chromium() -> None:
    """Fail with the fix when the browser is required but missing (the skip marker covers the other case)."""
    if not CHROMIUM.exists():
        pytest.fail(f"AETR_REQUIRE_BROWSER=1 but {CHROMIUM} is missing: install it with `apt-get install -y chromium`")


def screenshot_path(name: str) -> Path:
    """Where a screenshot named `name` goes: test-artifacts/ui/<name>.png."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS / f"{name}.png"


def publish(name: str) -> None:
    """Copy a screenshot into docs/screenshots when AETR_UPDATE_SCREENSHOTS=1 (the ones docs/ui.md shows)."""
    if UPDATE_DOCS:
        DOCS_SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(screenshot_path(name), DOCS_SCREENSHOTS / f"{name}.png")
