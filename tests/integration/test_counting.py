"""A parallel parent's finished children are counted exactly once, with the write of the event that ends each
child, whatever happens around it: a lost race counts nothing, a count left by an earlier version of AETR
still counts, and a parent whose last child was counted by a process that died is completed by another."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import text

from aetr.domain import decide
from aetr.domain.runs import Plan, Work
from aetr.store import Conflict
from aetr.store.requests import Apply, Chain, Lease, LoadChain, Program
from aetr.testing import StepService, never
from tests.integration.conftest import Server

DEAD = "a-process-that-died"


async def two_leaves_called(aetr: Server, steps_service: StepService) -> tuple[str, list[Any]]:
    """A run of a parallel parent of two leaves, both called, their calls' answers written (nothing else will
    write until a test does)."""
    steps_service.route("/leaf", never())
    await aetr.put_step({"name": "leaf", "kind": "api", "url": steps_service.url("/leaf")})
    await aetr.put_step({"name": "pair", "kind": "parallel", "reducer": "array",
                         "children": [{"step": "leaf"}, {"step": "leaf"}]})
    run_id = await aetr.start("pair")
    calls = await steps_service.wait_for_calls("/leaf", 2, timeout=15)
    status, run = await aetr.call("GET", f"/api/v1/runs/{run_id}")
    assert status == 200
    order = [child["id"] for child in run["children"]]
    calls.sort(key=lambda c: order.index(c.headers["AETR-Node-Id"]))  # in child order, as the output is
    deadline = asyncio.get_running_loop().time() + 10
    while await rows(aetr, "SELECT count(*) FROM work WHERE kind = 'dispatch'"):
        assert asyncio.get_running_loop().time() < deadline, "the calls' answers were not written within 10 s"
        await asyncio.sleep(0.01)
    return run_id, calls


async def rows(aetr: Server, sql: str) -> int:
    async with aetr.engine.store.engine.connect() as conn:
        return int((await conn.execute(text(sql))).scalar_one())


def succeed(leaf_id: str, output: Any, *, stale: bool = False, old_count_row: bool = False,
            lease: Lease | None = None) -> Program:
    """The event of a leaf's success, as the coordinator writes it (children counted in its write), with what
    a test asks: a version another event wrote meanwhile, the `count` row an earlier version of AETR wrote
    in place of counting, or the lease of a process that dies before it completes the parent."""
    chain: Chain = yield LoadChain(leaf_id)
    plan = Plan(now=datetime.now(UTC), count_later=True)
    plan.absorb(chain.nodes)
    leaf = plan.nodes[leaf_id]
    if stale:
        plan.loaded_versions[leaf_id] = leaf.version + 1
    verdict = yield from decide.step_succeeded(plan, leaf_id, leaf.attempt, output)
    assert verdict.outcome == "accepted", verdict
    if old_count_row:
        plan.work += [Work("count", parent_id, root_id, leaf.position, plan.now) for parent_id, root_id in plan.counted]
        plan.counted.clear()
    completed: list[str] = yield Apply(plan, lease=lease)
    return completed


async def test_a_child_whose_event_lost_a_race_is_not_counted(aetr: Server, steps_service: StepService) -> None:
    run_id, (first, second) = await two_leaves_called(aetr, steps_service)
    with pytest.raises(Conflict):
        await aetr.engine.store.run(succeed(first.headers["AETR-Node-Id"], "stale", stale=True))
    # Had the lost event counted its child, the parent would wait for a third child that never comes.
    for call, value in ((first, "a"), (second, "b")):
        async with aetr.http.post(call.headers["AETR-Callback"], json=value) as resp:
            assert resp.status == 200
    run = await aetr.wait_run(run_id)
    assert (run["state"], run["output"]) == ("complete", ["a", "b"]), run


async def test_a_count_left_by_an_earlier_version_still_completes_the_parent(
        aetr: Server, steps_service: StepService) -> None:
    run_id, (first, second) = await two_leaves_called(aetr, steps_service)
    async with aetr.http.post(first.headers["AETR-Callback"], json="a") as resp:
        assert resp.status == 200
    assert await aetr.engine.store.run(succeed(second.headers["AETR-Node-Id"], "b", old_count_row=True)) == []
    run = await aetr.wait_run(run_id)  # the worker finds the `count` row, counts it, completes the parent
    assert (run["state"], run["output"]) == ("complete", ["a", "b"]), run
    assert await rows(aetr, "SELECT count(*) FROM work") == 0


async def test_a_parent_whose_last_child_was_counted_by_a_process_that_died_completes_after_its_lease(
        aetr: Server, steps_service: StepService) -> None:
    run_id, (first, second) = await two_leaves_called(aetr, steps_service)
    async with aetr.http.post(first.headers["AETR-Callback"], json="a") as resp:
        assert resp.status == 200
    lease_s = 2.0
    until = datetime.now(UTC) + timedelta(seconds=lease_s)
    completed = await aetr.engine.store.run(
        succeed(second.headers["AETR-Node-Id"], "b", lease=Lease(DEAD, until, frozenset())))
    assert completed == [run_id]  # the write that counted the last child says so: its process completes it
    # ... but that process is gone. Its `complete` row is another process's once the lease is over, not before.
    status, run = await aetr.call("GET", f"/api/v1/runs/{run_id}")
    assert status == 200 and run["state"] == "executing", run
    run = await aetr.wait_run(run_id, timeout=lease_s + 15)
    assert (run["state"], run["output"]) == ("complete", ["a", "b"]), run
    assert datetime.now(UTC) >= until
    assert await rows(aetr, "SELECT count(*) FROM work") == 0
