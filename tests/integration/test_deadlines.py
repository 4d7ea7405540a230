"""A deadline counts from the call: an attempt whose call was never made is not failed as a time-out."""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import select, update

from aetr.domain.steps import DEFAULT_TIMEOUT_S
from aetr.engine.coordinator import utcnow
from aetr.store import Store
from aetr.store.requests import FinishCall, FinishCalls, single
from aetr.store.tables import run_nodes, work
from aetr.testing.engine import coordinator_without_http


async def _deadline_due(store: Store, node_id: str) -> list[datetime]:
    async with store.engine.connect() as conn:
        rows = await conn.execute(select(work.c.due_at).where(work.c.kind == "deadline", work.c.node_id == node_id))
        return [due for (due,) in rows]


async def _node(store: Store, node_id: str) -> tuple[str, int]:
    async with store.engine.connect() as conn:
        row = (await conn.execute(select(run_nodes.c.state, run_nodes.c.attempt)
                                  .where(run_nodes.c.id == node_id))).one()
        return str(row.state), int(row.attempt)


async def test_a_deadline_moves_on_while_its_call_is_still_to_be_made_and_applies_once_it_was(store: Store) -> None:
    coordinator, kept = await coordinator_without_http(store, "one", 1)
    await coordinator.start_run("one", 1, None)
    # The call is committed and leased, and never made: as when the process was killed right after the commit.
    (call,) = kept.calls
    node_id = call.work.node_id

    verdict = await coordinator.deadline_passed(node_id, 1)
    assert verdict.outcome == "refused"
    assert await _node(store, node_id) == ("executing", 1)
    (due,) = await _deadline_due(store, node_id)
    assert due >= utcnow() + timedelta(seconds=DEFAULT_TIMEOUT_S - 60)

    # Once the call was answered, its deadline fails the attempt when it comes (and the retry policy tries again);
    # a deadline row handled before its time is not due yet, and is left for then.
    await store.run(single(FinishCalls([FinishCall(node_id, 1)])))
    assert (await coordinator.deadline_passed(node_id, 1)).outcome == "refused"
    async with store.engine.begin() as conn:
        await conn.execute(update(work).where(work.c.kind == "deadline", work.c.node_id == node_id)
                           .values(due_at=utcnow() - timedelta(seconds=1)))
    assert (await coordinator.deadline_passed(node_id, 1)).outcome == "accepted"
    assert await _node(store, node_id) == ("executing", 2)
