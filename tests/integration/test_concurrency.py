"""Siblings finishing at the same moment: no lost update, and retries stay proportional to the children."""

from __future__ import annotations

import asyncio

import pytest

from aetr.testing import StepService, never
from tests.integration.conftest import Server, wait_no_work

CHILDREN = 1000
CLIENTS = 100


async def test_simultaneous_sibling_callbacks_lose_nothing(aetr: Server, steps_service: StepService) -> None:
    steps_service.route("/leaf", never())
    await aetr.put_step({"name": "leaf", "kind": "api", "url": steps_service.url("/leaf")})
    await aetr.put_step({"name": "wide", "kind": "parallel",
                         "children": [{"step": "leaf", "mapper": "(x, ctx) => ctx.index"}] * CHILDREN})
    run_id = await aetr.start("wide")
    calls = await steps_service.wait_for_calls("/leaf", CHILDREN, timeout=60)
    conflicts_before = aetr.engine.coordinator.conflicts
    queue: asyncio.Queue[tuple[str, int]] = asyncio.Queue()
    for call in calls:
        queue.put_nowait((call.headers["AETR-Callback"], call.json * 10))
    statuses: list[int] = []

    async def client() -> None:
        while not queue.empty():
            url, value = queue.get_nowait()
            async with aetr.http.post(url, json=value) as resp:
                statuses.append(resp.status)

    await asyncio.gather(*(client() for _ in range(CLIENTS)))
    run = await aetr.wait_run(run_id)
    assert statuses == [200] * CHILDREN
    assert run["state"] == "complete"
    assert run["output"] == [i * 10 for i in range(CHILDREN)]
    retries = aetr.engine.coordinator.conflicts - conflicts_before
    print(f"optimistic-lock retries for {CHILDREN} simultaneous sibling callbacks: {retries}")
    assert retries <= CHILDREN  # proportional to the children at worst, never their square


@pytest.mark.parametrize("counting", ["in the event", "after the commit"])
async def test_children_counted_either_way_complete_their_parent_once_and_leave_no_work(
        aetr: Server, steps_service: StepService, counting: str) -> None:
    # PostgreSQL counts after the commit, SQLite in the event; both ways work on both databases.
    aetr.engine.coordinator.count_later = counting == "after the commit"
    steps_service.route("/leaf", never())
    await aetr.put_step({"name": "leaf", "kind": "api", "url": steps_service.url("/leaf")})
    await aetr.put_step({"name": "inner", "kind": "parallel", "children": [{"step": "leaf"}] * 3})
    await aetr.put_step({"name": "outer", "kind": "parallel", "reducer": "array",
                         "children": [{"step": "inner"}, {"step": "leaf"}, {"step": "inner"}]})
    run_id = await aetr.start("outer")
    calls = await steps_service.wait_for_calls("/leaf", 7, timeout=30)
    answers = await asyncio.gather(*(aetr.http.post(c.headers["AETR-Callback"], json=k) for k, c in enumerate(calls)))
    assert [a.status for a in answers] == [200] * 7
    run = await aetr.wait_run(run_id)
    assert run["state"] == "complete"
    by_node = {c.headers["AETR-Node-Id"]: k for k, c in enumerate(calls)}
    leaves = [[by_node[n["id"]] for n in child["children"]] if child["children"] else by_node[child["id"]]
              for child in run["children"]]
    assert run["output"] == leaves  # each parallel parent keeps its children's order, completed exactly once
    _, history = await aetr.call("GET", f"/api/v1/runs/{run_id}/events")
    completions = [e for e in history
                   if e["kind"] == "state" and e["data"]["to"] == "complete" and e["node_id"] == run_id]
    assert len(completions) == 1
    leftover = await wait_no_work(aetr)
    assert leftover == 0, f"{leftover} work rows left behind"
