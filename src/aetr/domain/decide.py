"""The decide function: how one event moves a run tree, with no I/O.

Each handler is a generator over a `Plan`: when it needs data it does not hold it yields a request
(aetr.domain.requests) and the driver sends back the answer, so the same code runs against the database
(engine) and against a dict (tests). Only what an event touches is read: a callback on one child of a
10,000-wide parallel parent reads its ancestors and bumps an atomic counter, never its 9,999 siblings.
How each kind of step behaves is in its module (aetr.domain.kinds); how a run moves whatever its kinds is in
aetr.domain.flow.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

from aetr.domain import flow
from aetr.domain.kinds import api, parallel, wait
from aetr.domain.kinds import map as map_kind
from aetr.domain.kinds.api import MAX_RETRY_AFTER_S, attempt_failed, heartbeat, step_succeeded
from aetr.domain.requests import (
    ACCEPTED,
    BumpDone,
    BumpFailed,
    KeepItems,
    LoadChild,
    LoadChildren,
    LoadItems,
    LoadSubtree,
    NextItem,
    Park,
    ReadNextItem,
    Request,
    RunScript,
    ScriptResult,
    SetDone,
    Step,
    TakeSlot,
    Verdict,
)
from aetr.domain.runs import Plan

builtin_reduce = parallel.builtin_reduce
grow_map = map_kind.grow
signalled = wait.signalled
timer_fired = wait.timer_fired

__all__ = [
    "ACCEPTED",
    "MAX_RETRY_AFTER_S",
    "BumpDone",
    "BumpFailed",
    "KeepItems",
    "LoadChild",
    "LoadChildren",
    "LoadItems",
    "LoadSubtree",
    "NextItem",
    "Park",
    "ReadNextItem",
    "Request",
    "RunScript",
    "ScriptResult",
    "SetDone",
    "Step",
    "TakeSlot",
    "Verdict",
    "attempt_failed",
    "builtin_reduce",
    "cancel_run",
    "children_done",
    "deadline_passed",
    "grow_map",
    "heartbeat",
    "redrive",
    "signalled",
    "start_run",
    "step_succeeded",
    "timer_fired",
]


def start_run(plan: Plan, root_id: str) -> Step:
    """A new run: the root starts with the run's input (the plan holds the whole new tree)."""
    root = plan.nodes[root_id]
    plan.event(root, "run.started", {"step": root.step.name, "version": root.step.version})
    yield from flow.start(plan, root, root.input)


def deadline_passed(plan: Plan, node_id: str, attempt: int, heartbeat: bool = False,
                    ) -> Generator[Request, Any, Verdict]:
    """An attempt's deadline (or heartbeat deadline), or a signal wait's time-out, passed without an answer."""
    node = plan.nodes[node_id]
    if node.step.kind == "wait":
        return (yield from wait.deadline_passed(plan, node, attempt))
    if api.refusal(node, attempt):
        return Verdict("refused", "the attempt already ended")
    return (yield from api.deadline_passed(plan, node, attempt, heartbeat))


def cancel_run(plan: Plan, root_id: str) -> Generator[Request, Any, Verdict]:
    """Every node of the run that has not finished becomes cancelled."""
    yield from flow.load_run(plan, root_id)
    root = plan.nodes[root_id]
    if root.terminal:
        return Verdict("refused", f"the run is already {root.state}")
    plan.event(root, "cancel", {"from": root.state})
    error = {"message": "the run was cancelled", "kind": "cancelled", "node_id": root_id,
             "step": root.step.name}
    for node in list(plan.nodes.values()):
        if node.root_id == root_id and not node.terminal:
            plan.put(node, state="cancelled", completed_at=plan.now,
                     error=error if node.id == root_id else None)
            plan.drop_work_for.add(node.id)
    return ACCEPTED


def redrive(plan: Plan, root_id: str) -> Generator[Request, Any, Verdict]:
    """A run in error or cancelled goes on: failed and cancelled nodes run again, complete ones are kept."""
    yield from flow.load_run(plan, root_id)
    root = plan.nodes[root_id]
    if root.state not in ("error", "cancelled"):
        return Verdict("refused", f"the run is {root.state}: only a run in error or cancelled can be retried")
    plan.event(root, "run.retried", {"from": root.state})
    yield from flow.resume(plan, root)
    return ACCEPTED


def children_done(plan: Plan, parent_id: str) -> Generator[Request, Any, Verdict]:
    """A counting parent's counter reached its number of children (counted after their commits): complete it."""
    parent = plan.nodes[parent_id]
    if parent.state != "executing":
        return Verdict("refused", f"the parent is {parent.state}")
    if not (yield from flow.all_counted(plan, parent)):
        return Verdict("refused", "not every child is finished")
    return ACCEPTED
