"""A lost optimistic-lock race changes nothing: not the nodes, not the work queue, not the history.

On PostgreSQL an event's writes are one statement run without BEGIN and COMMIT, so this is the statement
aborting itself when a node changed meanwhile; on SQLite it is the event's transaction rolling back.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import text

from aetr.domain.runs import Plan, Work
from aetr.store import Conflict
from aetr.store.requests import Apply, Chain, FinishCall, LoadChain, Program
from aetr.store.store import count_round_trips
from aetr.testing import StepService, never
from tests.integration.conftest import Server


async def counts(aetr: Server) -> tuple[int, int]:
    async with aetr.engine.store.engine.connect() as conn:
        work = (await conn.execute(text("SELECT count(*) FROM work"))).scalar_one()
        events = (await conn.execute(text("SELECT count(*) FROM events"))).scalar_one()
    return work, events


async def dispatch_rows(aetr: Server) -> int:
    async with aetr.engine.store.engine.connect() as conn:
        rows: int = (await conn.execute(text("SELECT count(*) FROM work WHERE kind = 'dispatch'"))).scalar_one()
    return rows


async def test_an_event_that_lost_a_race_writes_nothing(aetr: Server, steps_service: StepService) -> None:
    steps_service.route("/leaf", never())
    await aetr.put_step({"name": "leaf", "kind": "api", "url": steps_service.url("/leaf")})
    await aetr.put_step({"name": "two", "kind": "sequential", "children": [{"step": "leaf"}, {"step": "leaf"}]})
    run_id = await aetr.start("two")
    (call,) = await steps_service.wait_for_calls("/leaf", 1, timeout=15)
    leaf_id = call.headers["AETR-Node-Id"]
    # The call's answer (its 202) is written a few ms after the call: wait for it, so nothing else writes.
    deadline = asyncio.get_running_loop().time() + 10
    while await dispatch_rows(aetr):
        assert asyncio.get_running_loop().time() < deadline, "the call's answer was not written within 10 s"
        await asyncio.sleep(0.01)
    before = await counts(aetr)
    status, run_before = await aetr.call("GET", f"/api/v1/runs/{run_id}")
    assert status == 200

    def stale_write() -> Program:
        chain: Chain = yield LoadChain(leaf_id)
        plan = Plan(now=datetime.now(UTC))
        plan.absorb(chain.nodes)
        leaf, root = plan.nodes[leaf_id], plan.nodes[run_id]
        plan.loaded_versions[leaf_id] = leaf.version + 1  # what another event would have written meanwhile
        plan.put(leaf, state="complete", output="late")
        plan.put(root, output="late")  # a node whose version is current: its change must go too
        plan.work.append(Work("deadline", leaf_id, run_id, leaf.attempt, plan.now))
        plan.event(leaf, "note", {"by": "the losing event"})
        yield Apply(plan, finished=[FinishCall(root.id, 0, "deadline")])

    with pytest.raises(Conflict):
        await aetr.engine.store.run(stale_write())
    assert await counts(aetr) == before
    status, run_after = await aetr.call("GET", f"/api/v1/runs/{run_id}")
    assert status == 200
    assert run_after == run_before
    leaf_after: dict[str, Any] = next(n for n in run_after["children"] if n["id"] == leaf_id)
    assert leaf_after["state"] == "executing" and leaf_after["output"] is None


async def test_events_arriving_together_fail_alone(aetr: Server, steps_service: StepService) -> None:
    # On PostgreSQL events that arrive together are written by one statement: one of them losing its race
    # must not undo or refuse the others.
    steps_service.route("/leaf", never())
    await aetr.put_step({"name": "leaf", "kind": "api", "url": steps_service.url("/leaf")})
    await aetr.put_step({"name": "two", "kind": "sequential", "children": [{"step": "leaf"}, {"step": "leaf"}]})
    runs = [await aetr.start("two") for _ in range(5)]
    calls = await steps_service.wait_for_calls("/leaf", 5, timeout=15)
    leaves = {c.headers["AETR-Run-Id"]: c.headers["AETR-Node-Id"] for c in calls}
    deadline = asyncio.get_running_loop().time() + 10
    while await dispatch_rows(aetr):
        assert asyncio.get_running_loop().time() < deadline, "the calls' answers were not written within 10 s"
        await asyncio.sleep(0.01)
    before = await counts(aetr)
    stale_run = runs[2]

    def note(leaf_id: str, stale: bool) -> Program:
        chain: Chain = yield LoadChain(leaf_id)
        plan = Plan(now=datetime.now(UTC))
        plan.absorb(chain.nodes)
        leaf = plan.nodes[leaf_id]
        if stale:
            plan.loaded_versions[leaf_id] = leaf.version + 1
        plan.put(leaf, output="noted")
        plan.event(leaf, "note", {"stale": stale})
        yield Apply(plan)
        return leaf_id

    seen: list[list[str]] = []

    async def one(run_id: str) -> str:
        with count_round_trips() as statements:
            seen.append(statements)
            result: str = await aetr.engine.store.run(note(leaves[run_id], run_id == stale_run))
            return result

    results = await asyncio.gather(*(one(r) for r in runs), return_exceptions=True)
    assert [isinstance(r, Conflict) for r in results] == [r == stale_run for r in runs]
    assert await counts(aetr) == (before[0], before[1] + 4)
    for run_id in runs:
        status, run = await aetr.call("GET", f"/api/v1/runs/{run_id}")
        assert status == 200
        (leaf,) = [n for n in run["children"] if n["id"] == leaves[run_id]]
        assert leaf["output"] == (None if run_id == stale_run else "noted")
    if aetr.engine.store.dialect == "postgresql":  # they did share their statements
        assert all(len(s) == 2 and "= any(" in s[0].lower() for s in seen), seen
