"""The tutorial, as a user follows it: example services, `aetr apply`, `aetr run --wait`, `aetr runs show`."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from aetr.examples import catalog_path
from tests.e2e.harness import AetrServer, Api, Launcher, cli, free_port, nodes_by_name, wait_listening

STEP_NAMES = ("ingest", "normalize", "images", "metadata", "index", "catalog-pipeline")
TREE = {"catalog-pipeline": "sequential", "ingest": "api", "normalize": "api", "enrich": "parallel",
        "images": "api", "metadata": "api", "index": "api"}
CATEGORIES = {"tools", "garden", "kitchen", "toys"}


def catalog_on_port(tmp_path: Path, port: int) -> Path:
    """A copy of the bundled catalog.yaml whose step URLs point at the example services on `port`."""
    text = catalog_path().read_text(encoding="utf-8")
    assert "http://127.0.0.1:8001/" in text, "catalog.yaml no longer names the services at 127.0.0.1:8001"
    copy = tmp_path / "catalog.yaml"
    copy.write_text(text.replace("http://127.0.0.1:8001/", f"http://127.0.0.1:{port}/"), encoding="utf-8")
    return copy


def mapped_for_normalize(ingested: dict[str, Any]) -> dict[str, Any]:
    """What the catalog's mapper makes of ingest's output: items renamed into products."""
    return {"source": ingested["source"],
            "products": [{"sku": i["id"], "title": i["name"], "price": i["price"], "currency": i["currency"]}
                         for i in ingested["items"]]}


@pytest.fixture
def services_port(launcher: Launcher) -> int:
    """The port of `aetr example-services`, started (not yet listening: it comes up while the server does)."""
    port = free_port()
    launcher.spawn("example-services", "--port", str(port))
    return port


async def test_the_tutorial_indexes_one_document_per_product_and_shows_every_step_complete(
        services_port: int, aetr: AetrServer, http: aiohttp.ClientSession, tmp_path: Path) -> None:
    await wait_listening(services_port)
    catalog = catalog_on_port(tmp_path, services_port)
    url = ("--url", aetr.url)

    applied = await cli(*url, "apply", "-f", str(catalog))
    assert applied.code == 0, applied
    for name in STEP_NAMES:
        assert re.search(rf"^created\s+{re.escape(name)}\s+version 1$", applied.stdout, re.M), applied

    ran = await cli(*url, "run", "catalog-pipeline", "--input", '{"source": "acme"}', "--wait")
    assert ran.code == 0, ran
    started = re.search(r"run ([0-9a-f-]{36}) started", ran.stderr)
    assert started, ran
    run_id = started[1]
    output = orjson.loads(ran.stdout)
    # ingest makes 3 items by default: sku-k named "<source> <noun>", priced 4.99 + 5k dollars.
    assert output["index"] == "catalog-acme" and output["indexed"] == 3, output
    documents = output["documents"]
    assert [(d["sku"], d["title"], d["price_cents"], d["currency"], d["image"]) for d in documents] == [
        ("sku-1", "Acme Widget", 999, "USD", "https://images.example.com/acme/sku-1.jpg"),
        ("sku-2", "Acme Gadget", 1499, "USD", "https://images.example.com/acme/sku-2.jpg"),
        ("sku-3", "Acme Gizmo", 1999, "USD", "https://images.example.com/acme/sku-3.jpg"),
    ]
    assert {d["category"] for d in documents} <= CATEGORIES

    shown = await cli(*url, "runs", "show", run_id)
    assert shown.code == 0, shown
    for name, kind in TREE.items():
        assert re.search(rf"\b{re.escape(name)}\s+{kind}\s+complete\b", shown.stdout), (name, shown)
    assert "output " in shown.stdout and "catalog-acme" in shown.stdout, shown

    run = await Api(http, aetr.url).run(run_id)
    nodes = nodes_by_name(run)
    assert set(nodes) == set(TREE)
    for name, node in nodes.items():
        assert node["state"] == "complete", (name, node)
        assert node["input"] is not None and node["output"] is not None, (name, node)
    assert nodes["catalog-pipeline"]["input"] == {"source": "acme"}
    assert nodes["ingest"]["input"] == {"source": "acme"}
    # The link's mapper reshaped ingest's output into normalize's input.
    assert nodes["normalize"]["input"] == mapped_for_normalize(nodes["ingest"]["output"])
    assert nodes["normalize"]["input"]["products"][0] == {
        "sku": "sku-1", "title": "  acme widget  ", "price": "9.99", "currency": "usd"}
    normalized = nodes["normalize"]["output"]
    assert nodes["enrich"]["input"] == nodes["images"]["input"] == nodes["metadata"]["input"] == normalized
    merged = {**nodes["images"]["output"], **nodes["metadata"]["output"]}
    assert nodes["enrich"]["output"] == nodes["index"]["input"] == merged
    categories = {p["sku"]: p["category"] for p in nodes["metadata"]["output"]["products"]}
    assert {d["sku"]: d["category"] for d in documents} == categories
    assert nodes["catalog-pipeline"]["output"] == nodes["index"]["output"] == output
