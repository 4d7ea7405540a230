"""The tutorial's example step services call back with their documented outputs, and catalog.yaml fits them."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import orjson
import pytest
from aiohttp import web

from aetr.cli.main import load_step_definitions
from aetr.examples import catalog_path
from aetr.examples.services import SERVICES, build_example_services
from aetr.testing import StepService

ACME_ITEMS = [
    {"id": "sku-1", "name": "  acme widget  ", "price": "9.99", "currency": "usd"},
    {"id": "sku-2", "name": "  acme gadget  ", "price": "14.99", "currency": "usd"},
    {"id": "sku-3", "name": "  acme gizmo  ", "price": "19.99", "currency": "usd"},
]
NORMALIZE_INPUT = {
    "source": "acme",
    "products": [{"sku": i["id"], "title": i["name"], "price": i["price"], "currency": i["currency"]}
                 for i in ACME_ITEMS],
}
NORMALIZED = {
    "source": "acme",
    "products": [
        {"sku": "sku-1", "title": "Acme Widget", "price_cents": 999, "currency": "USD"},
        {"sku": "sku-2", "title": "Acme Gadget", "price_cents": 1499, "currency": "USD"},
        {"sku": "sku-3", "title": "Acme Gizmo", "price_cents": 1999, "currency": "USD"},
    ],
}
IMAGES = {"images": {f"sku-{i}": f"https://images.example.com/acme/sku-{i}.jpg" for i in (1, 2, 3)}}


RUN_ID = "01a23caf-e775-70ac-9fd3-d8b698495148"


class Aetr:
    """Just enough of AETR for the example services: dispatch a step, collect its callback."""

    def __init__(self) -> None:
        self.callbacks: dict[str, asyncio.Future[tuple[str, Any]]] = {}
        self._runner: web.AppRunner | None = None
        self.base_url = ""
        self._count = 0

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/api/v1/callbacks/{token}", self._handle)
        app.router.add_post("/api/v1/callbacks/{token}/{outcome}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.base_url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.Response:
        outcome = request.match_info.get("outcome", "output")
        self.callbacks[request.match_info["token"]].set_result((outcome, orjson.loads(await request.read())))
        return web.json_response({"accepted": True})

    async def call(self, http: aiohttp.ClientSession, url: str, body: Any) -> tuple[str, Any, float]:
        """POST `body` to a step; return (outcome, callback body, seconds from dispatch to callback)."""
        self._count += 1
        token = f"tok-{self._count}"
        self.callbacks[token] = asyncio.get_running_loop().create_future()
        headers = {"AETR-Callback": f"{self.base_url}/api/v1/callbacks/{token}", "AETR-Run-Id": RUN_ID,
                   "AETR-Node-Id": "node-1", "AETR-Attempt": "1"}
        started = time.monotonic()
        async with http.post(url, data=orjson.dumps(body), headers=headers) as response:
            assert response.status == 202
        outcome, payload = await asyncio.wait_for(self.callbacks[token], 5.0)
        return outcome, payload, time.monotonic() - started


@pytest.fixture
async def aetr() -> AsyncIterator[Aetr]:
    fake = Aetr()
    await fake.start()
    yield fake
    await fake.close()


class Log(list[str]):
    """The lines the services logged, with a wait for a line that comes after the callback was sent."""

    def __init__(self) -> None:
        super().__init__()
        self._changed = asyncio.Event()

    def append(self, line: str) -> None:
        super().append(line)
        self._changed.set()

    async def wait_for_line(self, fragment: str) -> str:
        async with asyncio.timeout(5.0):
            while not (found := [line for line in self if fragment in line]):
                self._changed.clear()
                await self._changed.wait()
        return found[0]


@pytest.fixture
async def log() -> Log:
    return Log()


@pytest.fixture
async def services(log: Log) -> AsyncIterator[StepService]:
    async with build_example_services("127.0.0.1", 0, log=log.append) as svc:
        yield svc


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def test_ingest_calls_back_with_the_items_of_its_source(
        aetr: Aetr, services: StepService, http: aiohttp.ClientSession) -> None:
    outcome, output, _ = await aetr.call(http, services.url("/ingest"), {"source": "acme"})
    assert (outcome, output) == ("output", {"source": "acme", "items": ACME_ITEMS})


async def test_ingest_honours_count(aetr: Aetr, services: StepService, http: aiohttp.ClientSession) -> None:
    _, output, _ = await aetr.call(http, services.url("/ingest"), {"source": "zeta", "count": 5})
    assert [i["id"] for i in output["items"]] == [f"sku-{n}" for n in range(1, 6)]
    assert output["items"][4] == {"id": "sku-5", "name": "  zeta doohickey  ", "price": "29.99", "currency": "usd"}


async def test_normalize_tidies_titles_and_prices(aetr: Aetr, services: StepService,
                                                  http: aiohttp.ClientSession) -> None:
    assert (await aetr.call(http, services.url("/normalize"), NORMALIZE_INPUT))[:2] == ("output", NORMALIZED)


async def test_images_gives_one_url_per_sku(aetr: Aetr, services: StepService, http: aiohttp.ClientSession) -> None:
    assert (await aetr.call(http, services.url("/images"), NORMALIZED))[:2] == ("output", IMAGES)


async def test_metadata_adds_a_stable_category_and_tags(
        aetr: Aetr, services: StepService, http: aiohttp.ClientSession) -> None:
    _, first, _ = await aetr.call(http, services.url("/metadata"), NORMALIZED)
    _, again, _ = await aetr.call(http, services.url("/metadata"), NORMALIZED)
    assert first == again
    assert first["source"] == "acme"
    for before, after in zip(NORMALIZED["products"], first["products"], strict=True):
        assert after == {**before, "category": after["category"], "tags": ["acme", after["category"]]}
        assert after["category"] in {"tools", "garden", "kitchen", "toys"}


async def test_index_writes_one_document_per_product(
        aetr: Aetr, services: StepService, http: aiohttp.ClientSession) -> None:
    products = [{**p, "category": "tools"} for p in NORMALIZED["products"]]
    _, output, _ = await aetr.call(http, services.url("/index"), {"source": "acme", "products": products, **IMAGES})
    assert output["index"] == "catalog-acme" and output["indexed"] == 3
    assert output["documents"][0] == {"sku": "sku-1", "title": "Acme Widget", "price_cents": 999, "currency": "USD",
                                      "category": "tools", "image": "https://images.example.com/acme/sku-1.jpg"}


async def test_each_service_calls_back_after_its_short_delay_and_logs_one_line(
        aetr: Aetr, services: StepService, http: aiohttp.ClientSession, log: Log) -> None:
    inputs = {"/ingest": {"source": "acme"}, "/normalize": NORMALIZE_INPUT, "/images": NORMALIZED,
              "/metadata": NORMALIZED, "/index": {**NORMALIZED, **IMAGES}}
    results = await asyncio.gather(*(aetr.call(http, services.url(s.path), inputs[s.path]) for s in SERVICES))
    for service, (outcome, _, took) in zip(SERVICES, results, strict=True):
        assert 0.2 <= service.delay_s <= 0.5
        assert outcome == "output" and took >= service.delay_s
    assert len(log) == len(SERVICES)
    for service in SERVICES:
        (line,) = [line for line in log if f" {service.path.lstrip('/')} " in line]
        # The millisecond the run was made, which runs of the same minute do not share.
        assert "run 01a23caf-e775 attempt 1" in line and "\n" not in line


async def test_a_malformed_input_fails_the_step_without_retry_and_says_what_was_expected(
        aetr: Aetr, services: StepService, http: aiohttp.ClientSession, log: Log) -> None:
    outcome, body, _ = await aetr.call(http, services.url("/normalize"), {"items": []})
    assert outcome == "fail" and body["retryable"] is False
    assert body["error"].startswith('normalize expects {"source": ..., "products": [')
    assert "AETR answered 200" in await log.wait_for_line("normalize failed: normalize expects")


def test_catalog_yaml_defines_the_five_services_then_the_pipeline_that_uses_them() -> None:
    steps = load_step_definitions(str(catalog_path()))
    names = [s["name"] for s in steps]
    assert names == ["ingest", "normalize", "images", "metadata", "index", "catalog-pipeline"]
    for step in steps[:5]:
        url = urlsplit(step["url"])
        assert (step["kind"], url.hostname, url.port, url.path) == ("api", "127.0.0.1", 8001, f"/{step['name']}")
    assert {s.path for s in SERVICES} == {f"/{n}" for n in names[:5]}
    pipeline = steps[5]
    assert pipeline["kind"] == "sequential"
    assert [c["step"] if isinstance(c["step"], str) else c["step"]["name"] for c in pipeline["children"]] == [
        "ingest", "normalize", "enrich", "index"]
    enrich = pipeline["children"][2]["step"]
    assert enrich["kind"] == "parallel" and [c["step"] for c in enrich["children"]] == ["images", "metadata"]


def _js(source: str, value: Any, ctx: dict[str, Any]) -> Any:
    """Apply a mapper `(input, ctx) => value` as docs/api.md describes it, in V8."""
    racer = pytest.importorskip("py_mini_racer").MiniRacer()
    return orjson.loads(racer.eval(f"JSON.stringify(({source})({orjson.dumps(value).decode()}, "
                                   f"{orjson.dumps(ctx).decode()}))"))


def _reduce(reducer: str, outputs: list[Any]) -> Any:
    assert reducer == "merge", "the tutorial uses the merge reducer"
    merged: dict[str, Any] = {}
    for output in outputs:  # shallow, later children win (the merge reducer)
        merged.update(output)
    return merged


async def test_catalog_pipeline_data_flows_through_the_mappers_and_the_merge(
        aetr: Aetr, services: StepService, http: aiohttp.ClientSession) -> None:
    """Play the coordinator over catalog.yaml's tree (each child gets its mapper's result) against the real
    example services."""
    pipeline = load_step_definitions(str(catalog_path()))[-1]
    run_input = {"source": "acme"}

    async def run_child(link: dict[str, Any], value: Any, index: int) -> Any:
        step = link["step"]
        if link.get("mapper"):
            name = step if isinstance(step, str) else step["name"]
            value = _js(link["mapper"], value, {"run": {"id": "run-1", "input": run_input},
                                                "step": {"name": name}, "index": index})
        if isinstance(step, dict) and step["kind"] == "parallel":
            outputs = await asyncio.gather(*(run_child(c, value, k) for k, c in enumerate(step["children"])))
            return _reduce(step["reducer"], list(outputs))
        outcome, output, _ = await aetr.call(http, services.url(f"/{step}"), value)
        assert outcome == "output", f"{step} failed: {output}"
        return output

    value: Any = run_input
    seen: list[Any] = []
    for position, link in enumerate(pipeline["children"]):
        value = await run_child(link, value, position)
        seen.append(value)
    assert seen[1] == NORMALIZED  # the mapper reshaped ingest's items into normalize's products
    assert set(seen[2]) == {"source", "products", "images"}  # merge joined metadata and images
    assert value["index"] == "catalog-acme" and value["indexed"] == 3
    for document in value["documents"]:
        assert document["image"] == f"https://images.example.com/acme/{document['sku']}.jpg"
        assert document["category"] in {"tools", "garden", "kitchen", "toys"}
        assert document["price_cents"] in {999, 1499, 1999}
