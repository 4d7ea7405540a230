"""The web UI in a real browser (Debian's Chromium through Playwright) against the real `aetr serve`.

A user builds the tutorial's catalog pipeline in the page, tries a mapper in the test bench, starts a run and
watches it complete live; the page shows failures, refusals, conflicts and the token prompt; it works with the
keyboard and in a 400 px wide window. Screenshots go to test-artifacts/ui/ (and docs/screenshots/ with
AETR_UPDATE_SCREENSHOTS=1).
"""

from __future__ import annotations

import re
import secrets
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import pytest
import pytest_asyncio
from playwright.async_api import Locator, Page, expect

from aetr.testing import StepService, callback, never, status
from tests.e2e.conftest import LOGS
from tests.e2e.harness import AetrServer, Api, Launcher, free_port, wait_listening
from tests.e2e.ui_helpers import (
    DESKTOP,
    EXPECT_TIMEOUT_MS,
    NARROW,
    TALL,
    needs_browser,
    publish,
    screenshot_path,
)

# One event loop for the module: the server, the step services and the browser start once and serve every test
# (each test gets a fresh browser context and its own step names); the token test has its own server.
pytestmark = pytest.mark.asyncio(loop_scope="module")

CATALOG_STEPS = ("ingest", "normalize", "images", "metadata", "index")
NORMALIZE_MAPPER = """(input, ctx) => ({
  source: input.source,
  products: input.items.map((item) => ({
    sku: item.id, title: item.name, price: item.price, currency: item.currency,
  })),
})"""
BROKEN_MAPPER = """(input, ctx) => {
  const items = input.items;
  return items.nope.map((item) => item.id);
}"""

expect.set_options(timeout=EXPECT_TIMEOUT_MS)


# ---- fixtures ---------------------------------------------------------------------------------------------------


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def processes(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Launcher]:
    """The `aetr` processes of this module, stopped at its end."""
    started = Launcher(tmp_path_factory.mktemp("ui"))
    try:
        yield started
    finally:
        await started.stop_all()


@pytest.fixture(autouse=True)
def show_logs(request: pytest.FixtureRequest, processes: Launcher) -> None:
    """A failing test shows the logs of the module's `aetr` processes (see conftest.py)."""
    request.node.stash[LOGS] = processes.log_paths


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def example_services(processes: Launcher) -> int:
    """The port of `aetr example-services` (the tutorial's five step services), started, maybe not listening yet."""
    port = free_port()
    processes.spawn("example-services", "--port", str(port))
    return port


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def server(processes: Launcher, example_services: int) -> AetrServer:
    """`aetr serve` on a fresh SQLite file (the UI is the same on every backend); the step services start meanwhile."""
    return await processes.serve(f"sqlite:///{processes.workdir / 'aetr.db'}")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def guarded(processes: Launcher) -> tuple[AetrServer, str]:
    """Another `aetr serve`, with AETR_API_TOKEN set; and its token."""
    token = secrets.token_urlsafe(16)
    url = f"sqlite:///{processes.workdir / 'guarded.db'}"
    return await processes.serve(url, env={"AETR_API_TOKEN": token}), token


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def services_port(example_services: int) -> int:
    """The port of the example step services, once they listen."""
    await wait_listening(example_services)
    return example_services



@pytest_asyncio.fixture(loop_scope="module")
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    """An HTTP client session in the module's event loop."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        yield session


@pytest_asyncio.fixture(loop_scope="module")
async def api(server: AetrServer, client: aiohttp.ClientSession) -> Api:
    """Raw HTTP to the server, for what happens "elsewhere" while the user works in the page."""
    return Api(client, server.url)


# ---- helpers ----------------------------------------------------------------------------------------------------


async def shoot(page: Page, name: str, *, docs: bool = False) -> None:
    """Save a screenshot of the window to test-artifacts/ui/ (and docs/screenshots/ when `docs` and asked to)."""
    await page.evaluate("document.getElementById('toasts').replaceChildren()")  # passing notes hide the page
    await page.screenshot(path=screenshot_path(name), animations="disabled")
    if docs:
        publish(name)


def child_row(page: Page | Locator, name: str) -> Locator:
    """The row of a parent's child that links to the step `name`."""
    return page.locator("li.child").filter(has=page.get_by_role("link", name=name, exact=True))


async def add_existing_child(search: Locator, name: str) -> None:
    """Search for a step in an "Add an existing step" field and pick it from the matches shown under it."""
    await search.fill(name)
    matches = search.locator("xpath=following-sibling::ul[1]")
    await matches.get_by_role("button", name=re.compile(rf"^{re.escape(name)} ")).click()


async def create_api_step(page: Page, name: str, url: str) -> None:
    """Create an api step through the form."""
    await page.get_by_role("navigation", name="Main").get_by_role("link", name="Steps").click()
    await page.get_by_role("link", name="+ New api step").click()
    await page.get_by_label("Name", exact=True).fill(name)
    await page.get_by_label("URL").fill(url)
    await page.get_by_label("Timeout (s)").fill("60")
    await page.get_by_label("Max attempts").fill("2")
    await page.get_by_role("button", name="Create step").click()
    await expect(page.get_by_role("heading", level=1)).to_have_text(name)
    await expect(page.get_by_label("URL")).to_have_value(url)


UNLABELLED = """() => [
  ...[...document.querySelectorAll('input, select, textarea')]
    .filter((el) => !el.labels?.length && !el.getAttribute('aria-label') && !el.getAttribute('aria-labelledby'))
    .map((el) => `${el.tagName} ${el.outerHTML.slice(0, 80)}`),
  ...[...document.querySelectorAll('button, a[href]')]
    .filter((el) => !el.textContent.trim() && !el.getAttribute('aria-label'))
    .map((el) => `${el.tagName} ${el.outerHTML.slice(0, 80)}`),
]"""


async def assert_every_control_is_labelled(page: Page) -> None:
    """Every field has a label and every button or link a name, for screen readers and get_by_label alike."""
    unlabelled = await page.evaluate(UNLABELLED)
    assert not unlabelled, f"controls without an accessible name: {unlabelled}"


def run_state(page: Page) -> Locator:
    """The run's state badge next to its title."""
    return page.locator(".title-line .state").first


async def no_horizontal_overflow(page: Page) -> None:
    """Nothing on the page is wider than the window: it never scrolls sideways."""
    width = await page.evaluate("document.documentElement.scrollWidth")
    viewport = page.viewport_size
    assert viewport is not None and width <= viewport["width"], f"the page is {width} px wide in {viewport}"


# ---- the tests --------------------------------------------------------------------------------------------------


@needs_browser
async def test_a_user_builds_the_catalog_pipeline_tries_its_mapper_and_watches_a_run_complete_live(
        page: Page, server: AetrServer, services_port: int, api: Api) -> None:
    await page.goto(server.url + "/")
    await expect(page.get_by_role("heading", name="Steps", level=1)).to_be_visible()

    for name in CATALOG_STEPS:
        await create_api_step(page, name, f"http://127.0.0.1:{services_port}/{name}")
    await page.get_by_role("navigation", name="Main").get_by_role("link", name="Steps").click()
    steps = page.get_by_role("table", name="Steps")
    await page.get_by_label("Search steps").fill("meta")
    await expect(steps.get_by_role("link")).to_have_text(["metadata"])
    await page.get_by_label("Search steps").fill("")
    for name in CATALOG_STEPS:
        await expect(steps.get_by_role("link", name=name, exact=True)).to_be_visible()

    # The sequential parent: children found by search, an inline parallel one, a mapper on the normalize link.
    await page.get_by_role("link", name="+ New sequential").click()
    await page.get_by_label("Name", exact=True).fill("catalog-pipeline")
    root_search = page.get_by_label("Add an existing step").last
    await add_existing_child(root_search, "ingest")
    await add_existing_child(root_search, "normalize")
    await page.get_by_label("or a new inline step").last.select_option("parallel")
    await page.get_by_role("button", name="+ Add inline step").last.click()
    enrich = page.locator("li.child").filter(has=page.locator("input[data-field=name]"))
    await expect(enrich.get_by_label("Name", exact=True)).to_be_focused()
    await enrich.get_by_label("Name", exact=True).fill("enrich")
    await enrich.get_by_label("Join the outputs with").select_option("merge")
    enrich_search = enrich.get_by_label("Add an existing step")
    await add_existing_child(enrich_search, "images")
    await add_existing_child(enrich_search, "metadata")
    await add_existing_child(root_search, "index")
    await expect(page.locator("ol.children").first.locator(":scope > li > .child-head > .child-title")).to_have_text(
        ["ingest", "normalize", re.compile("^enrich"), "index"])

    await assert_every_control_is_labelled(page)
    normalize = child_row(page, "normalize")
    await normalize.get_by_role("button", name="Edit the mapper of normalize").click()
    mapper = normalize.get_by_label("Mapper for child 2 (normalize)")
    await expect(mapper).to_be_focused()
    await mapper.fill(NORMALIZE_MAPPER)

    # The test bench, on a sample payload: the result, then a script error with its line.
    bench = normalize.get_by_role("region", name="Test bench for this mapper")
    await bench.get_by_label("Sample input").fill(
        '{"source": "acme", "items": [{"id": "sku-1", "name": "Widget", "price": "9.99", "currency": "usd"}]}')
    await bench.get_by_role("button", name="Run test").click()
    result = bench.locator(".bench-result")
    await expect(result).to_contain_text("✓ Result")
    await expect(result.locator("pre")).to_contain_text('"sku": "sku-1"')
    await expect(result.locator("pre")).to_contain_text('"title": "Widget"')
    await normalize.scroll_into_view_if_needed()
    await shoot(page, "mapper-test-bench", docs=True)

    await mapper.fill(BROKEN_MAPPER)
    await mapper.press("Control+Enter")
    await expect(result).to_contain_text("Script error on line 3")
    await expect(result).to_contain_text("TypeError")
    await result.get_by_role("button", name="Go to line 3").click()
    await expect(mapper).to_be_focused()
    assert await mapper.evaluate("t => t.value.slice(t.selectionStart, t.selectionEnd)") == \
        "  return items.nope.map((item) => item.id);"
    # A mapper cut short is reported where its author left a brace open, not at a token they never wrote.
    await mapper.fill("(input) => {")
    await mapper.press("Control+Enter")
    await expect(result).to_contain_text("Script error on line 1, column 12")
    await expect(result).to_contain_text("the brace opened on line 1, column 12 is closed")
    await mapper.fill(NORMALIZE_MAPPER)

    await page.get_by_role("button", name="Create step").click()
    await expect(page.get_by_role("heading", level=1)).to_have_text("catalog-pipeline")
    tree = page.get_by_role("region", name="Tree")
    await expect(tree.get_by_text("reducer: merge")).to_be_visible()
    await expect(tree.get_by_text("ƒ mapper")).to_have_count(1)
    await expect(tree.get_by_role("link", name="metadata")).to_be_visible()
    stored = await api.call("GET", "/api/v1/steps/catalog-pipeline")
    assert [c["step"]["name"] for c in stored[1]["children"]] == ["ingest", "normalize", "enrich", "index"]
    assert stored[1]["children"][1]["mapper"] == NORMALIZE_MAPPER
    await shoot(page, "step-tree", docs=True)

    # Start a run with a JSON input checked as you type; watch it complete without reloading the page.
    start = page.get_by_role("region", name="Start a run")
    run_input = start.get_by_label("Input (JSON)")
    await run_input.fill('{"source": "acme"')
    await expect(start.get_by_text("not valid JSON")).to_be_visible()
    await expect(start.get_by_role("button", name="Start run")).to_be_disabled()
    await run_input.fill('{"source": "acme"}')
    await expect(start.get_by_text("✓ valid JSON")).to_be_visible()
    await start.get_by_role("button", name="Start run").click()
    await expect(page).to_have_url(re.compile(r"#/runs/[0-9a-f-]{36}$"))
    await page.evaluate("window.__sameDocument = true")
    await expect(run_state(page)).to_have_text(re.compile("complete"))
    output = page.get_by_role("region", name="✓ Output")
    await expect(output).to_contain_text('"index": "catalog-acme"')
    await expect(output).to_contain_text('"indexed": 3')
    assert await page.evaluate("window.__sameDocument === true"), "the page reloaded instead of updating live"
    await expect(page.locator(".run-node .node-button")).to_have_count(7)
    await expect(page.locator(".node-button.state-border-complete")).to_have_count(7)
    await expect(page.locator(".g-bar.state-complete")).to_have_count(7)
    await expect(page.get_by_role("region", name="History")).to_contain_text("run.started")
    await page.locator(".run-tree").get_by_role("button", name=re.compile("^normalize")).click()
    await expect(page.get_by_role("region", name="Node")).to_contain_text('"title": "Acme Widget"')
    await assert_every_control_is_labelled(page)
    await page.set_viewport_size(TALL)
    await shoot(page, "run-complete", docs=True)

    # In a 400 px window the run view stays readable: nothing wider than the window.
    await page.set_viewport_size(NARROW)
    await expect(output).to_be_visible()
    await no_horizontal_overflow(page)
    await shoot(page, "run-narrow", docs=True)

    await page.set_viewport_size(DESKTOP)
    # Back in the editor, the test bench offers what the normalize link received in that run.
    await page.get_by_role("heading", level=1).get_by_role("link", name="catalog-pipeline").click()
    normalize = child_row(page, "normalize")
    await expect(normalize.get_by_label("Mapper for child 2 (normalize)")).to_have_value(NORMALIZE_MAPPER)
    bench = normalize.get_by_role("region", name="Test bench for this mapper")
    await bench.get_by_label("data recorded in a past run").check()
    await expect(bench.get_by_label("Past run", exact=True)).to_be_enabled()
    await expect(bench.get_by_label("Past run", exact=True).locator("option")).to_have_count(1)
    await expect(bench.locator("pre").first).to_contain_text('"items"')  # ingest's output, as normalize's mapper got it
    await bench.get_by_role("button", name="Run test").click()
    await expect(bench.locator(".bench-result")).to_contain_text("Same as the input normalize received in that run")

    await page.get_by_role("navigation", name="Main").get_by_role("link", name="Steps").click()
    await expect(page.get_by_role("table", name="Steps").get_by_role("link", name="catalog-pipeline")).to_be_visible()
    await shoot(page, "steps-list", docs=True)


@needs_browser
async def test_the_run_page_follows_a_run_live_and_shows_its_output_when_the_callback_arrives(
        page: Page, server: AetrServer, api: Api, client: aiohttp.ClientSession) -> None:
    async with StepService() as svc:
        svc.route("/hold", never())
        await api.put_step({"name": "hold", "kind": "api", "url": svc.url("/hold"), "timeout_s": 60})
        await page.goto(server.url + "/#/runs")
        start = page.get_by_role("region", name="Start a run")
        await start.get_by_label("Step").fill("hold")
        await start.get_by_label("Input (JSON)").fill('{"n": 7}')
        await start.get_by_role("button", name="Start run").click()
        await expect(run_state(page)).to_have_text(re.compile("executing"))
        await expect(page.locator(".live")).to_have_text("Live")
        await expect(page.get_by_role("button", name="Cancel run")).to_be_enabled()
        await page.evaluate("window.__sameDocument = true")
        await shoot(page, "run-executing")

        (call,) = await svc.wait_for_calls("/hold", 1)
        assert call.callback_url is not None
        async with client.post(call.callback_url, json={"held": call.json}) as answer:
            assert answer.status == 200, await answer.text()

        await expect(run_state(page)).to_have_text(re.compile("complete"))
        await expect(page.get_by_role("region", name="✓ Output")).to_contain_text('"n": 7')
        await expect(page.locator(".live")).to_have_text("Run over")
        await expect(page.get_by_role("button", name="Cancel run")).to_be_disabled()
        assert await page.evaluate("window.__sameDocument === true"), "the page reloaded instead of updating live"

        # Cancel a second run from its page.
        second = await api.start_run("hold", {"n": 8})
        await page.goto(f"{server.url}/#/runs/{second}")
        await expect(run_state(page)).to_have_text(re.compile("executing"))
        await page.get_by_role("button", name="Cancel run").click()
        await expect(run_state(page)).to_have_text(re.compile("cancelled"))
        await expect(page.get_by_role("alert")).to_contain_text("The run was cancelled")
        await expect(page.get_by_role("button", name="Retry run")).to_be_enabled()

    # The runs list: filtered by step and state, a page at a time.
    await page.goto(f"{server.url}/#/runs")
    await expect(page.get_by_role("table", name="Runs, newest first").locator("tbody tr")).not_to_have_count(0)
    await shoot(page, "runs-list", docs=True)
    await page.goto(f"{server.url}/#/runs?step=hold&limit=1")
    runs = page.get_by_role("table", name="Runs, newest first")
    await expect(runs.locator("tbody tr")).to_have_count(1)
    await expect(runs.locator("tbody tr")).to_contain_text("cancelled")
    await page.get_by_role("button", name="Load older runs").click()
    await expect(runs.locator("tbody tr")).to_have_count(2)
    await expect(runs.locator("tbody tr").nth(1)).to_contain_text("complete")
    await expect(page.get_by_role("button", name="Load older runs")).to_be_hidden()
    await page.get_by_label("State", exact=True).select_option("complete")
    await expect(runs.locator("tbody tr")).to_have_count(1)
    await expect(page).to_have_url(re.compile(r"#/runs\?state=complete&step=hold&limit=1$"))


@needs_browser
async def test_a_failing_step_shows_its_error_on_the_run_page_and_in_a_narrow_window(
        page: Page, server: AetrServer, api: Api) -> None:
    async with StepService() as svc:
        svc.route("/fragile", status(400, {"detail": "price list has no currency column"}))
        await api.put_step({"name": "fragile", "kind": "api", "url": svc.url("/fragile"), "timeout_s": 30,
                            "retry": {"max_attempts": 1, "backoff_s": 0.1, "max_backoff_s": 1}})
        await api.put_step({"name": "import", "kind": "sequential", "children": [{"step": "fragile"}]})
        await page.goto(server.url + "/#/steps/import")
        await page.get_by_role("region", name="Start a run").get_by_role("button", name="Start run").click()

        await expect(run_state(page)).to_have_text(re.compile("error"))
        failure = page.get_by_role("alert").filter(has_text="The run failed at step fragile")
        await expect(failure).to_contain_text("answered HTTP 400")
        await expect(failure).to_contain_text("price list has no currency column")
        await failure.get_by_role("button", name="Show fragile").click()
        node = page.get_by_role("region", name="Node")
        await expect(node.get_by_role("heading", name="fragile")).to_be_visible()
        await expect(node).to_contain_text("Error (http)")
        await expect(page.get_by_role("button", name="Retry run")).to_be_enabled()
        await shoot(page, "run-error", docs=True)

        # Retry runs the failed node again (and it fails again, the same way).
        await page.get_by_role("button", name="Retry run").click()
        await expect(node.get_by_text("dispatch — attempt 2")).to_be_visible()
        await expect(run_state(page)).to_have_text(re.compile("error"))

        await page.set_viewport_size(NARROW)
        await expect(failure).to_be_visible()
        await no_horizontal_overflow(page)
        await shoot(page, "run-error-narrow")


@needs_browser
async def test_deleting_a_step_that_a_parent_uses_is_refused_with_its_parents_named(
        page: Page, server: AetrServer, api: Api) -> None:
    await api.put_step({"name": "fetch-prices", "kind": "api", "url": "http://127.0.0.1:9/prices"})
    await api.put_step({"name": "nightly", "kind": "sequential", "children": [{"step": "fetch-prices"}]})
    await page.goto(server.url + "/#/steps/fetch-prices")
    await expect(page.get_by_role("region", name="Used by").get_by_role("link", name="nightly")).to_be_visible()

    await page.get_by_role("button", name="Delete…").click()
    await page.get_by_role("button", name="Delete fetch-prices").click()

    refusal = page.get_by_role("alert").filter(has_text="Cannot delete fetch-prices")
    await expect(refusal).to_contain_text("used by nightly")
    assert (await api.call("GET", "/api/v1/steps/fetch-prices"))[0] == 200

    # A step no parent uses goes.
    await refusal.get_by_role("link", name="nightly").click()
    await page.get_by_role("button", name="Delete…").click()
    await page.get_by_role("button", name="Delete nightly").click()
    await expect(page.get_by_role("heading", name="Steps", level=1)).to_be_visible()
    await expect(page.get_by_role("link", name="fetch-prices")).to_be_visible()
    await expect(page.get_by_role("link", name="nightly")).to_have_count(0)


@needs_browser
async def test_saving_a_step_changed_elsewhere_says_so_and_keeps_the_typed_text(
        page: Page, server: AetrServer, api: Api) -> None:
    await api.put_step({"name": "crawl", "kind": "api", "url": "http://127.0.0.1:9/v1"})
    await page.goto(server.url + "/#/steps/crawl")
    url = page.get_by_label("URL")
    await expect(url).to_have_value("http://127.0.0.1:9/v1")

    await url.fill("http://127.0.0.1:9/typed-by-hand")
    await page.get_by_label("Heartbeat (s)").fill("15")
    await page.get_by_role("button", name="+ Add header").click()
    await page.get_by_label("Header name").fill("X-Tenant")
    await page.get_by_label("Header value").fill("acme")
    await api.put_step({"name": "crawl", "kind": "api", "url": "http://127.0.0.1:9/v2", "timeout_s": 120})
    await page.get_by_role("button", name="Save changes").click()

    conflict = page.get_by_role("alert").filter(has_text=re.compile("changed elsewhere — reload", re.I))
    await expect(conflict).to_be_visible()
    await expect(url).to_have_value("http://127.0.0.1:9/typed-by-hand")
    await expect(page.get_by_label("Heartbeat (s)")).to_have_value("15")
    await expect(page.get_by_label("Header value")).to_have_value("acme")
    assert (await api.call("GET", "/api/v1/steps/crawl"))[1]["url"] == "http://127.0.0.1:9/v2"
    await shoot(page, "conflict", docs=True)

    await conflict.get_by_role("button", name="Save mine over theirs").click()
    await expect(page.locator(".head-meta")).to_contain_text("version 3")
    stored = (await api.call("GET", "/api/v1/steps/crawl"))[1]
    assert (stored["url"], stored["heartbeat_s"], stored["headers"], stored["version"]) == (
        "http://127.0.0.1:9/typed-by-hand", 15, {"X-Tenant": "acme"}, 3)


@needs_browser
async def test_children_are_reordered_with_the_keyboard_alone_and_by_dragging(
        page: Page, server: AetrServer, api: Api) -> None:
    for name in ("a", "b", "c"):
        await api.put_step({"name": name, "kind": "api", "url": f"http://127.0.0.1:9/{name}"})
    await api.put_step({"name": "trio", "kind": "sequential", "children": [{"step": "a"}, {"step": "b"},
                                                                           {"step": "c", "mapper": "(x) => x"}]})
    await api.put_step({"name": "duo", "kind": "parallel", "children": [{"step": "a"}, {"step": "a"}]})
    await page.set_viewport_size(TALL)  # every row in view: the drag needs no scrolling
    await page.goto(server.url + "/#/steps/trio")
    titles = page.locator("ol.children > li > .child-head > .child-title")
    await expect(titles).to_have_text(["a", "b", "c"])
    tree = page.get_by_role("region", name="Tree")
    await expect(tree.locator("li.tree-leaf", has=page.get_by_role("link", name="a", exact=True))).to_contain_text(
        "reused — used by 2 parents: duo, trio")
    await expect(tree.locator(".reused")).to_have_count(1)

    handle = page.get_by_role("button", name="Reorder c, child 3 of 3")
    await handle.focus()
    await page.keyboard.press("ArrowUp")
    await page.keyboard.press("ArrowUp")
    await expect(titles).to_have_text(["c", "a", "b"])
    await expect(page.get_by_role("button", name="Reorder c, child 1 of 3")).to_be_focused()
    await page.get_by_role("button", name="Move b up").focus()
    await page.keyboard.press("Alt+ArrowUp")
    await expect(titles).to_have_text(["c", "b", "a"])
    await page.keyboard.press("Control+s")
    await expect(page.locator(".head-meta")).to_contain_text("version 2")
    stored = (await api.call("GET", "/api/v1/steps/trio"))[1]
    assert [(c["step"]["name"], c["mapper"]) for c in stored["children"]] == [("c", "(x) => x"), ("b", None),
                                                                               ("a", None)]

    await page.get_by_role("button", name="Reorder a, child 3 of 3").drag_to(
        page.get_by_role("button", name="Reorder c, child 1 of 3"), target_position={"x": 4, "y": 2})
    await expect(titles).to_have_text(["a", "c", "b"])

    # Shortcuts: ? shows them, Esc closes, g then r goes to the runs.
    await page.get_by_role("heading", level=1).click()
    await page.keyboard.press("?")
    await expect(page.get_by_role("dialog", name="Keyboard shortcuts")).to_be_visible()
    await page.keyboard.press("Escape")
    await expect(page.get_by_role("dialog")).to_have_count(0)
    page.once("dialog", lambda dialog: dialog.accept())  # "leave without saving?": yes
    await page.keyboard.press("g")
    await page.keyboard.press("r")
    await expect(page.get_by_role("heading", name="Runs", level=1)).to_be_visible()


@needs_browser
async def test_with_an_api_token_the_page_asks_for_it_once_and_keeps_it_for_the_session(
        page: Page, guarded: tuple[AetrServer, str], client: aiohttp.ClientSession) -> None:
    server, token = guarded
    user = Api(client, server.url, token)
    async with StepService() as svc:
        svc.route("/echo", callback(lambda value: {"echoed": value}, delay=0.3))
        await user.put_step({"name": "echo", "kind": "api", "url": svc.url("/echo"), "timeout_s": 30})
        await page.goto(server.url + "/")

        prompt = page.get_by_role("dialog", name="API token needed")
        await expect(prompt).to_be_visible()
        await expect(prompt.get_by_label("API token")).to_be_focused()
        await shoot(page, "token-prompt", docs=True)
        await prompt.get_by_label("API token").fill("not-the-token")
        await prompt.get_by_label("API token").press("Enter")
        await expect(prompt).to_contain_text("The server refused that token")
        await prompt.get_by_label("API token").fill(token)
        await prompt.get_by_role("button", name="Use this token").click()
        await expect(prompt).to_have_count(0)
        await expect(page.get_by_role("link", name="echo")).to_be_visible()

        # Kept for the session: other pages, a reload and the live stream use it without asking again.
        await page.reload()
        await expect(page.get_by_role("link", name="echo")).to_be_visible()
        await page.get_by_role("link", name="echo").click()
        await page.get_by_role("region", name="Start a run").get_by_label("Input (JSON)").fill("[1, 2]")
        await page.get_by_role("button", name="Start run").click()
        await expect(run_state(page)).to_have_text(re.compile("complete"))
        await expect(page.get_by_role("region", name="✓ Output")).to_contain_text('"echoed"')
        await expect(page.get_by_role("dialog")).to_have_count(0)


async def test_the_stream_sends_the_run_tree_at_once_and_says_when_the_run_is_over(
        server: AetrServer, api: Api, client: aiohttp.ClientSession, guarded: tuple[AetrServer, str]) -> None:
    await api.put_step({"name": "nothing-to-do", "kind": "sequential"})
    run = await api.wait_run(await api.start_run("nothing-to-do", {"n": 1}))

    async with client.get(f"{server.url}/api/v1/runs/{run['id']}/stream") as answer:
        assert answer.status == 200 and answer.content_type == "text/event-stream"
        messages = (await answer.text()).split("\n\n")

    assert messages[0].startswith("event: run\ndata: ") and orjson.loads(messages[0].split("data: ", 1)[1]) == run
    assert messages[1:] == ['event: end\ndata: {"state":"complete"}', ""]
    for unknown in (str(uuid.uuid4()), "not-a-uuid"):
        async with client.get(f"{server.url}/api/v1/runs/{unknown}/stream") as missing:
            assert missing.status == 404 and "no run with id" in (await missing.json())["detail"]
    guarded_server, _ = guarded
    async with client.get(f"{guarded_server.url}/api/v1/runs/{run['id']}/stream") as anonymous:
        assert anonymous.status == 401


async def test_the_page_and_its_files_are_served_by_aetr_serve_and_are_not_in_the_api_schema(
        server: AetrServer, client: aiohttp.ClientSession) -> None:
    async with client.get(server.url + "/") as page_answer:
        html = await page_answer.text()
        assert page_answer.status == 200 and "/ui/js/main.js" in html
        assert "default-src 'self'" in page_answer.headers["Content-Security-Policy"]
    async with client.get(server.url + "/ui/js/main.js") as script:
        assert script.status == 200 and script.content_type == "text/javascript"
    for path in ("/ui/../api/app.py", "/ui/js/%2e%2e/%2e%2e/__init__.py", "/ui/nothing.js"):
        async with client.get(server.url + path) as missing:
            assert missing.status == 404, path
    async with client.get(server.url + "/openapi.json") as schema:
        paths: dict[str, Any] = (await schema.json())["paths"]
        assert not [p for p in paths if p == "/" or p.startswith("/ui") or p.endswith("/stream")], paths


# ---- the map, choice and wait kinds on the run page -------------------------------------------------------------


@needs_browser
async def test_a_choice_shows_the_branch_it_took_and_greys_the_ones_it_skipped(
        page: Page, server: AetrServer, api: Api) -> None:
    await api.put_step({"name": "route-order", "kind": "choice", "children": [
        {"step": {"name": "route-express", "kind": "wait", "seconds": 0}, "when": "(input) => input.total > 100"},
        {"step": {"name": "route-standard", "kind": "wait", "seconds": 0}, "when": "(input) => input.total > 10"},
        {"step": {"name": "route-review", "kind": "wait", "seconds": 0}},
    ]})
    run_id = await api.start_run("route-order", {"order": "A-17", "total": 42})
    await page.set_viewport_size(DESKTOP)
    await page.goto(f"{server.url}/#/runs/{run_id}")
    await expect(run_state(page)).to_have_text(re.compile("complete"))
    tree = page.get_by_role("region", name="Tree")
    await expect(tree.locator(".badge.taken")).to_have_text("took route-standard")
    skipped = tree.locator("li.run-node.state-skipped")
    await expect(skipped).to_have_count(2)
    await expect(skipped.first).to_contain_text("route-express")
    await expect(skipped.first).to_contain_text("skipped")
    opacity = await skipped.first.locator(".node-button").evaluate("(el) => Number(getComputedStyle(el).opacity)")
    assert opacity < 1, "a skipped node is not greyed out"
    await expect(tree.locator("li.run-node.state-complete")).to_have_count(2)  # the choice and the child it took
    await expect(page.get_by_role("region", name="Node")).to_contain_text("Took route-standard (child 2 of 3)")
    await shoot(page, "run-choice", docs=True)


@needs_browser
async def test_a_signal_wait_is_approved_or_rejected_through_the_form_on_the_run_page(
        page: Page, server: AetrServer, api: Api) -> None:
    await api.put_step({"name": "approve-refund", "kind": "wait", "signal": True, "timeout_s": 600})
    await api.put_step({"name": "refund", "kind": "sequential", "children": [{"step": "approve-refund"}]})
    run_id = await api.start_run("refund", {"order": "A-17", "amount": 42})
    await page.goto(f"{server.url}/#/runs/{run_id}")
    tree = page.get_by_role("region", name="Tree")
    await expect(tree).to_contain_text("awaiting signal")
    form = page.get_by_role("form", name="Answer approve-refund")
    await expect(form).to_be_visible()  # the page selects the wait that awaits its answer
    await expect(form.get_by_label("Output (JSON)")).to_have_value(re.compile('"amount": 42'))
    await form.get_by_label("Output (JSON)").fill('{"approved": tru')
    await form.get_by_role("button", name="Approve").click()
    await expect(form.get_by_role("alert")).to_contain_text("The output is not valid JSON")
    await form.get_by_label("Output (JSON)").fill('{"approved": true, "by": "ana"}')
    await shoot(page, "run-signal", docs=True)
    await form.get_by_role("button", name="Approve").click()

    await expect(run_state(page)).to_have_text(re.compile("complete"))
    await expect(page.get_by_role("region", name="✓ Output")).to_contain_text('"by": "ana"')
    await expect(form).to_be_hidden()
    node_id = (await api.run(run_id))["children"][0]["id"]
    status, body = await api.call("POST", f"/api/v1/runs/{run_id}/nodes/{node_id}/signal", {"output": 1})
    assert status == 409, body

    # Rejected: the run fails with the reason, as a `signal` error.
    second = await api.start_run("refund", {"order": "A-18", "amount": 9000})
    await page.goto(f"{server.url}/#/runs/{second}")
    form = page.get_by_role("form", name="Answer approve-refund")
    await form.get_by_role("button", name="Reject").click()
    await expect(form.get_by_role("alert")).to_contain_text("Enter a reason")
    await form.get_by_label("Reason to reject").fill("amount over the refund limit")
    await form.get_by_role("button", name="Reject").click()
    await expect(run_state(page)).to_have_text(re.compile("error"))
    failure = page.get_by_role("alert").filter(has_text="The run failed")
    await expect(failure).to_contain_text("amount over the refund limit")
    await expect(failure).to_contain_text("kind: signal")


@needs_browser
async def test_a_map_of_200_items_shows_its_counts_and_one_page_of_items_and_its_failed_ones(
        page: Page, server: AetrServer, api: Api) -> None:
    await api.put_step({
        "name": "resize-all", "kind": "map", "items": "(input) => input.images", "tolerated_failures": "10%",
        "reducer": "(outputs) => ({resized: outputs.filter((o) => o !== null).length})",
        "child": {"step": {"name": "resize-one", "kind": "wait", "seconds": 0.05},
                  "mapper": "(item, ctx) => { if (item % 40 === 7) throw new Error(`image ${item} is corrupt`);"
                            " return {image: item}; }"}})
    run_id = await api.start_run("resize-all", {"images": list(range(200))})
    await page.set_viewport_size(TALL)
    await page.goto(f"{server.url}/#/runs/{run_id}")
    await expect(run_state(page)).to_have_text(re.compile("complete"), timeout=60_000)
    tree = page.get_by_role("region", name="Tree")
    panel = tree.locator(".map-panel")
    await expect(panel.locator(".map-counts")).to_contain_text("200 / 200 items done (100%)")
    await expect(panel.locator(".map-counts")).to_contain_text("195 complete")
    await expect(panel.locator(".map-counts")).to_contain_text("5 error")
    progress = panel.get_by_role("progressbar")
    await expect(progress).to_have_attribute("aria-valuenow", "200")
    await expect(tree.locator("li.run-node")).to_have_count(51)  # the map and one page of its items, not 200
    await expect(panel).to_contain_text("Items 1–50 of 200")
    await panel.get_by_role("button", name="Next items of resize-all").click()
    await expect(panel).to_contain_text("Items 51–100 of 200")
    await expect(tree.locator("li.run-node").nth(1)).to_contain_text("#50")

    await panel.get_by_role("button", name="Show failed (5)").click()
    await expect(panel).to_contain_text("Failed items 1–5 of 5")
    await expect(tree.locator("li.run-node.state-error")).to_have_count(5)
    await expect(tree.locator("li.run-node")).to_have_count(6)
    await tree.locator("li.run-node.state-error").first.locator(".node-button").click()
    await expect(page.get_by_role("region", name="Node")).to_contain_text("image 7 is corrupt")
    await shoot(page, "run-map", docs=True)
    await panel.get_by_role("button", name="Show all items").click()
    await expect(tree.locator("li.run-node")).to_have_count(51)


@needs_browser
async def test_a_timed_wait_shows_when_it_ends(page: Page, server: AetrServer, api: Api) -> None:
    await api.put_step({"name": "cool-down", "kind": "wait", "seconds": 300})
    run_id = await api.start_run("cool-down", {})
    await page.goto(f"{server.url}/#/runs/{run_id}")
    await expect(page.get_by_role("region", name="Tree")).to_contain_text(
        re.compile(r"until \d\d:\d\d:\d\d \(in (4 min|5 min)"))
    await page.get_by_role("button", name="Cancel run").click()
    await expect(run_state(page)).to_have_text(re.compile("cancelled"))


@needs_browser
async def test_the_step_editor_composes_wait_choice_and_map_steps(page: Page, server: AetrServer, api: Api) -> None:
    await api.put_step({"name": "ed-default", "kind": "wait", "seconds": 0})
    await page.goto(f"{server.url}/#/steps")
    await page.get_by_role("link", name="+ New wait").click()
    await page.get_by_label("Name", exact=True).fill("ed-hold")
    await page.get_by_label("for a signal").check()
    await page.get_by_label("Signal timeout (s)").fill("600")
    await page.get_by_role("button", name="Create step").click()
    await expect(page.get_by_role("heading", level=1)).to_have_text("ed-hold")
    _, saved = await api.call("GET", "/api/v1/steps/ed-hold")
    assert (saved["kind"], saved["signal"], saved["timeout_s"]) == ("wait", True, 600), saved

    await page.goto(f"{server.url}/#/steps/new/choice")
    await page.get_by_label("Name", exact=True).fill("ed-triage")
    await add_existing_child(page.get_by_label("Add an existing step"), "ed-hold")
    await add_existing_child(page.get_by_label("Add an existing step"), "ed-default")
    await page.get_by_role("button", name="Create step").click()
    await expect(page.get_by_role("alert")).to_contain_text("child 1 needs a “when” script")
    await page.get_by_label("When for child 1").fill("(input) => input.urgent")
    await page.get_by_role("button", name="Create step").click()
    await expect(page.get_by_role("heading", level=1)).to_have_text("ed-triage")
    _, saved = await api.call("GET", "/api/v1/steps/ed-triage")
    assert [c.get("when") for c in saved["children"]] == ["(input) => input.urgent", None], saved

    await page.goto(f"{server.url}/#/steps/new/map")
    await page.get_by_label("Name", exact=True).fill("ed-each")
    await page.get_by_label("Items script of").fill("(input, ctx) => input.cases")
    await add_existing_child(page.get_by_label("Add an existing step"), "ed-triage")
    await page.get_by_label("Max concurrency").fill("5")
    await page.get_by_label("Tolerated failures").fill("10%")
    await page.set_viewport_size(TALL)
    await page.evaluate("window.scrollTo(0, 0)")
    await expect(page.get_by_role("region", name="Preview")).to_contain_text("ed-triage")
    await shoot(page, "step-map-editor", docs=True)
    await page.get_by_role("button", name="Create step").click()
    await expect(page.get_by_role("heading", level=1)).to_have_text("ed-each")
    _, saved = await api.call("GET", "/api/v1/steps/ed-each")
    assert saved["items"] == "(input, ctx) => input.cases", saved
    assert (saved["child"]["step"]["name"], saved["max_concurrency"], saved["tolerated_failures"]) == (
        "ed-triage", 5, "10%"), saved
    await expect(page.get_by_label("Items script of")).to_have_value("(input, ctx) => input.cases")

    run_id = await api.start_run("ed-each", {"cases": [{"urgent": False}, {"urgent": False}]})
    run = await api.wait_run(run_id)
    assert run["state"] == "complete", run
