"""The tutorial, as a user follows it: example services, `aetr apply`, `aetr run --wait`, `aetr runs show`, and
the README's own commands that keep a run's id in a shell variable."""

from __future__ import annotations

import asyncio
import json
import re
import shlex
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from aetr.examples import catalog_path
from tests.e2e.harness import (
    CLI_TERMINAL,
    AetrServer,
    Api,
    Launcher,
    aetr_command,
    clean_env,
    cli,
    free_port,
    nodes_by_name,
    wait_listening,
)

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


README = Path(__file__).resolve().parents[2] / "README.md"
SHELL_BLOCK = re.compile(r"```sh\n(.*?)```", re.S)
SCRIPT_TIMEOUT_S = 90.0  # seconds for the README's commands, which wait for one run to end
RUN_ID = re.compile(r"^([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})$")


def json_values(text: str) -> list[Any]:
    """The JSON documents `text` holds one after another (curl ends none with a new line)."""
    decoder, values, at = json.JSONDecoder(), [], 0
    while text[at:].strip():
        value, at = decoder.raw_decode(text, len(text) - len(text[at:].lstrip()))
        values.append(value)
    return values


def readme_blocks_using_the_run_id() -> list[str]:
    """The tutorial's shell blocks that keep a run's id in $RUN or use it, in the README's order."""
    text = README.read_text(encoding="utf-8")
    tutorial = text[text.index("## Tutorial"):text.index("### Fan out")]
    return [block for block in SHELL_BLOCK.findall(tutorial) if "$RUN" in block or "RUN=$(" in block]


async def test_the_readme_s_commands_keep_the_new_run_s_id_and_the_next_commands_find_the_run(
        services_port: int, launcher: Launcher, tmp_path: Path) -> None:
    await wait_listening(services_port)
    server = await launcher.serve(f"sqlite:///{tmp_path / 'aetr.db'}")
    applied = await cli("--url", server.url, "apply", "-f", str(catalog_on_port(tmp_path, services_port)))
    assert applied.code == 0, applied
    blocks = readme_blocks_using_the_run_id()
    assert len(blocks) >= 3 and any("RUN=$(" in block for block in blocks), blocks
    # The README's commands as written, with a marker line before each block's output; only the places
    # differ: this checkout's `aetr` and this test's server.
    script = "set -euo pipefail\n" + "".join(f"echo '== block {i}'\n{block}" for i, block in enumerate(blocks))
    script = script.replace(".venv/bin/aetr", shlex.join(aetr_command()))
    script = script.replace("http://127.0.0.1:9999", server.url)
    bash = await asyncio.create_subprocess_exec(
        "bash", "-c", script, env=clean_env({**CLI_TERMINAL, "AETR_URL": server.url}), cwd=tmp_path,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    stdout, stderr = await asyncio.wait_for(bash.communicate(), SCRIPT_TIMEOUT_S)
    said = f"stdout:\n{stdout.decode()}\nstderr:\n{stderr.decode()}"
    assert bash.returncode == 0, said
    outputs = re.split(r"^== block \d+\n", stdout.decode(), flags=re.M)[1:]
    assert len(outputs) == len(blocks), said

    started = RUN_ID.match(outputs[0].strip())  # `echo "$RUN"`: the id alone
    assert started, said
    run_id = started[1]
    assert re.search(r"catalog-pipeline\s+sequential", outputs[1]), said  # `aetr runs show "$RUN"`
    shown, ended = json_values(outputs[2])  # curl: the run of $RUN, then the one started over HTTP, waited for
    assert shown["id"] == run_id and shown["input"] == {"source": "globex"}, said
    assert ended["id"] != run_id and ended["state"] == "complete", said
    assert ended["input"] == {"source": "initech"} and ended["output"]["index"] == "catalog-initech", said
