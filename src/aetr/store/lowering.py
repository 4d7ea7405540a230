"""Lowering: an event's program — its requests — as operations on prebuilt statements.

`lower` runs a program and turns each request it yields (the decide handlers' and aetr.store.requests') into
`Fetch`, `Exec` and `ExecMany` of the backend's Statements, and the rows back into the request's answer. So
the SQLite backend can run a whole event in its writer and the PostgreSQL backend on one asyncpg connection,
with the same code deciding what to send.
"""

from __future__ import annotations

from collections.abc import Generator
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson

from aetr.domain import decide
from aetr.domain.kinds.api import spec_of as api_spec_of
from aetr.domain.runs import Node, Plan, Work
from aetr.store.errors import Conflict
from aetr.store.operations import Exec, ExecMany, Fetch, Op, OpStream
from aetr.store.requests import (
    Apply,
    Chain,
    Claim,
    ClaimedWork,
    ClaimResult,
    CountChild,
    FindRunByKey,
    FinishCalls,
    InsertRun,
    LoadChain,
    LoadRoot,
    LoadTree,
    NextWaiting,
    NotifyTried,
    PendingCall,
    Postpone,
    Program,
    RenewLease,
    WorkDue,
)
from aetr.store.statements import HANDING_S, PARKED, Statements
from aetr.store.step_trees import tree_from_rows

# Seconds a queued attempt stays set aside at most: a slot freed without waking it (its step's limit raised by
# a new version, say) is found by then.
PARK_S = 60.0


def lower(program: Program, st: Statements) -> OpStream:
    """A program's requests as operations; RunScript passes through to the backend, which calls the sandbox."""
    answer: Any = None
    while True:
        try:
            req = program.send(answer)
        except StopIteration as stop:
            return stop.value
        if isinstance(req, decide.RunScript):
            answer = yield req
        else:
            answer = yield from _ops(req, st)


def _ops(req: Any, st: Statements) -> Generator[Op, Any, Any]:
    if isinstance(req, LoadTree):
        return tree_from_rows((yield Fetch(st.load_tree, {"key": req.key})), req.key)
    if isinstance(req, LoadChain):
        values: dict[str, Any] = {"node_id": req.node_id}
        if req.ends_attempt and req.now is not None and st.load_chains_claiming is not None:
            values.update(ends=True, now=st.time_in(req.now))  # PostgreSQL's batches claim with it (postgres.py)
        rows = yield Fetch(st.load_chain, values)
        following = [st.node(r[1:]) for r in rows if r[0] == 1]
        return Chain([st.node(r[1:]) for r in rows if r[0] == 0], following[0] if following else None)
    if isinstance(req, decide.LoadChild):
        rows = yield Fetch(st.load_child, {"parent_id": req.parent_id, "position": req.position})
        return st.node(rows[0]) if rows else None
    if isinstance(req, decide.LoadChildren):
        return [st.node(r) for r in (yield Fetch(st.load_children, {"parent_id": req.parent_id}))]
    if isinstance(req, decide.LoadSubtree):
        return [st.node(r) for r in (yield Fetch(st.load_subtree, {"node_id": req.node_id}))]
    if isinstance(req, decide.BumpDone):
        ((count,),) = yield Fetch(st.bump_done, {"parent_id": req.parent_id})
        return count
    if isinstance(req, decide.SetDone):
        yield Exec(st.set_done, {"parent_id": req.parent_id, "value": req.value, "failed": req.failed,
                                 "next_item": req.next_item})
        return None
    if isinstance(req, decide.TakeSlot):
        return (yield from _take_slot(req, st))
    if isinstance(req, decide.Park):
        until = datetime.now(UTC) + timedelta(seconds=PARK_S)
        yield Exec(st.park, {"node_id": req.node_id, "attempt": req.attempt, "until": st.time_in(until)})
        if st.wake_waiters is not None:  # committed: now a slot freed meanwhile is seen (see WAKE_WAITERS_PG)
            yield Exec(st.wake_waiters, {"step_id": req.step_id, "limit": req.limit, "count": 1})
        return None
    if isinstance(req, NextWaiting):
        if st.claim_waiting is not None:
            rows = yield Fetch(st.claim_waiting, {
                "step_id": req.step_id, "count": req.count, "now": st.time_in(req.now), "besides": list(req.besides),
                "until": st.time_in(req.now + timedelta(seconds=HANDING_S))})
        else:  # SQLite: one writer at a time; the attempts passed over are read too, and skipped by the caller
            rows = yield Fetch(st.next_waiting, {"step_id": req.step_id, "count": req.count + len(req.besides),
                                                 "now": st.time_in(req.now)})
        return [st.node(r) for r in rows]
    if isinstance(req, decide.KeepItems):
        items = None if req.items is None else orjson.dumps(req.items).decode()
        yield Exec(st.keep_items, {"node_id": req.node_id, "items": items})
        return None
    if isinstance(req, decide.LoadItems):
        rows = yield Fetch(st.load_items, {"node_id": req.node_id})
        return orjson.loads(rows[0][0]) if rows and rows[0][0] is not None else None
    if isinstance(req, decide.ReadNextItem):
        ((position,),) = yield Fetch(st.read_next_item, {"node_id": req.node_id})
        return position
    if isinstance(req, decide.BumpFailed):
        ((failed,),) = yield Fetch(st.bump_failed, {"parent_id": req.parent_id})
        return failed
    if isinstance(req, decide.NextItem):
        ((taken,),) = yield Fetch(st.next_item, {"parent_id": req.parent_id})
        return taken - 1
    if isinstance(req, Apply):
        return (yield from _apply(req, st))
    if isinstance(req, FindRunByKey):
        rows = yield Fetch(st.find_key, {"key": req.key})
        return rows[0][0] if rows else None
    if isinstance(req, FinishCalls):
        if req.calls:
            plan = Plan(now=datetime.now(UTC), events=[c.record for c in req.calls if c.record is not None])
            yield from _apply(Apply(plan, finished=req.calls), st)
        return None
    if isinstance(req, RenewLease):
        yield Exec(st.renew_lease, {"node_id": req.node_id, "attempt": req.attempt, "owner": req.owner,
                                    "until": st.time_in(req.until)})
        return None
    if isinstance(req, Claim):
        return (yield from _claim(req, st))
    if isinstance(req, LoadRoot):
        ids: Any = [req.root_id] if st.dialect == "postgresql" else req.root_id  # see Statements.ids_match
        rows = yield Fetch(st.nodes_by_id, {"ids": ids})
        return st.node(rows[0]) if rows else None
    if isinstance(req, NotifyTried):
        key = {"node_id": req.notification_id, "attempt": req.attempt, "owner": req.owner}
        if req.next_at is None:
            kept = yield Exec(st.notify_done, key)
        else:
            kept = yield Exec(st.notify_again, {**key, "due_at": st.time_in(req.next_at)})
        if kept != 1:
            return False
        yield ExecMany(st.insert_event, [st.event_values(req.record)])
        return True
    if isinstance(req, PendingCall):
        rows = yield Fetch(st.pending_call, {"node_id": req.node_id, "attempt": req.attempt})
        if not rows:
            return None
        times = [t for t in map(st.time_out, rows[0]) if t is not None]  # due_at, and lease_until when leased
        return max(times)
    if isinstance(req, WorkDue):
        rows = yield Fetch(st.work_due, {"node_id": req.node_id, "attempt": req.attempt, "kind": req.kind})
        return st.time_out(rows[0][0]) if rows else None
    if isinstance(req, Postpone):
        yield Exec(st.postpone, {"node_id": req.node_id, "attempt": req.attempt, "kind": req.kind,
                                 "due_at": st.time_in(req.due_at)})
        return None
    if isinstance(req, CountChild):
        values = {"parent_id": req.parent_id, "position": req.position, "now": st.time_in(req.now),
                  "owner": req.owner, "until": st.time_in(req.until)}
        if st.count_children is not None:  # PostgreSQL: one statement (a batch merges several, see postgres.py)
            rows = yield Fetch(st.count_children, {"parent_ids": [req.parent_id], "positions": [req.position],
                                                   "now": values["now"], "owner": req.owner, "until": values["until"]})
            return bool(rows)
        if (yield Exec(st.drop_count, values)) != 1:
            return False  # counted already
        ((done, n_children, root_id),) = yield Fetch(st.bump_count, values)
        if done != n_children:
            return False
        yield ExecMany(st.insert_work, [{"kind": "complete", "node_id": req.parent_id, "root_id": root_id,
                                         "attempt": 0, "due_at": values["now"], "lease_owner": req.owner,
                                         "lease_until": values["until"]}])
        return True
    raise TypeError(f"no SQL for request {req!r}")


def _take_slot(req: decide.TakeSlot, st: Statements) -> Generator[Op, Any, bool]:
    if st.take_slot is None:  # SQLite: count the holders, this event's takers included
        ((held,),) = yield Fetch(st.count_slots, {"step_id": req.step_id})
        return bool(held + req.earlier < req.limit)
    values = {"step_id": req.step_id, "limit": req.limit, "node_id": req.node_id, "attempt": req.attempt}
    ((mine, taken, made),) = yield Fetch(st.take_slot, values)
    if mine is None and taken is None and not made:
        assert st.make_slots is not None
        yield Fetch(st.make_slots, values)  # the step's first attempt at this limit: its rows, then try again
        ((mine, taken, made),) = yield Fetch(st.take_slot, values)
    return mine is not None or taken is not None


def _slot_moves(plan: Plan) -> tuple[list[dict[str, Any]], list[tuple[str, int, int]]]:
    """The slot rows this event frees (PostgreSQL): each freed slot goes to an attempt of its step it was handed
    to, or becomes free; and the steps (with a limit) to look at after the commit for an attempt waiting while a
    slot is free: those whose slot this event freed without handing it on, and those it set attempts aside for."""
    handed: dict[str, list[Node]] = {}
    for node_id in sorted(plan.handed):
        node = plan.nodes[node_id]
        handed.setdefault(node.step.id, []).append(node)
    moves: list[dict[str, Any]] = []
    look: dict[tuple[str, int], int] = {}  # (step id, limit): attempts to wake at most
    for step_id, old_id in plan.released:
        takers = handed.get(step_id)
        new = takers.pop(0) if takers else None
        moves.append({"old": old_id, "new": None if new is None else new.id,
                      "attempt": None if new is None else new.attempt})
        if new is None:
            key = (step_id, _limit(plan.nodes[old_id]))
            look[key] = look.get(key, 0) + 1
    for _, node_id, _ in plan.parked:
        node = plan.nodes[node_id]
        key = (node.step.id, _limit(node))
        look[key] = look.get(key, 0) + 1
    return sorted(moves, key=lambda m: m["old"]), sorted((s, limit, n) for (s, limit), n in look.items())


def _limit(node: Node) -> int:
    return api_spec_of(node).max_concurrency or 1


def _new_rows(plan: Plan, run: InsertRun | None, st: Statements,
              ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The run_nodes rows and run_counters rows of the nodes an event creates (a new run's, a map's items)."""
    rows = []
    for n in plan.created:
        rows.append({"id": n.id, "root_id": n.root_id, "parent_id": n.parent_id, "position": n.position,
                     "step_id": n.step.id, "step_name": n.step.name, "step_kind": n.step.kind,
                     "step_version": n.step.version, "config": n.step.fields_text,
                     "mapper": n.mapper, "n_children": n.n_children,
                     "created_at": st.time_in(n.created_at), "snapshot": None, "idempotency_key": None,
                     "notify": n.notify, "trace": n.trace, **st.state_values(n)})
    if run is not None:
        rows[0]["snapshot"] = run.snapshot
        rows[0]["idempotency_key"] = run.idempotency_key
    counters = [{"node_id": node_id, "done": c.done, "failed": c.failed, "next_item": c.next_item,
                 "items": None if c.items is None else orjson.dumps(c.items).decode()}
                for node_id, c in plan.counters.items()]
    return rows, counters


def _apply(req: Apply, st: Statements) -> Generator[Op, Any, list[str]]:
    """Write the plan; answers the parents whose last children it counted (their `complete` rows stored)."""
    plan = req.plan
    new_nodes, new_counters = _new_rows(plan, req.new_run, st) if plan.inserted else ([], [])
    if new_nodes and st.write_all is None:
        yield ExecMany(st.insert_node, new_nodes)
        if new_counters:
            yield ExecMany(st.insert_counter, new_counters)
    # In id order, so that two events changing the same nodes lock them in the same order.
    changed = sorted(plan.changed, key=lambda n: n.id)
    node_rows = []
    for node in changed:
        values = st.state_values(node)
        values["k_id"] = node.id
        values["k_version"] = plan.loaded_versions[node.id]
        node_rows.append(values)
    if st.write_all is None:
        for values in node_rows:
            if (yield Exec(st.update_node, values)) != 1:
                raise Conflict(values["k_id"])
    drop = sorted(plan.drop_work_for)
    beats = sorted(plan.drop_heartbeats_for - plan.drop_work_for)
    # In node id order, like every other event's work rows: two transactions never wait on each other.
    finished = [{"node_id": c.node_id, "attempt": c.attempt, "kind": c.kind}
                for c in sorted(req.finished, key=lambda c: c.node_id) if c.node_id not in plan.drop_work_for]
    moved = [{"node_id": c.node_id, "attempt": c.attempt, "kind": kind, "at": st.time_in(at)}
             for c in req.finished if c.node_id not in plan.drop_work_for
             for kind, at in (("deadline", c.deadline_at), ("heartbeat", c.heartbeat_at)) if at is not None]
    if moved and st.write_all is None:  # calls made late: their deadlines count from the call
        yield ExecMany(st.move_deadline, moved)
    lease = req.lease
    work_rows = [st.work_values(w, lease.owner, lease.until)
                 if lease is not None and (w.kind, w.node_id, w.attempt) in lease.keys
                 else st.work_values(w) for w in plan.work]
    if plan.parked:  # attempts set aside at once: their rows are leased to the waiting mark, not claimable
        parked_until = plan.now + timedelta(seconds=PARK_S)
        work_rows = [{**row, "lease_owner": PARKED, "lease_until": st.time_in(parked_until)}
                     if (w.kind, w.node_id, w.attempt) in plan.parked else row
                     for row, w in zip(work_rows, plan.work, strict=True)]
    event_rows = [st.event_values(e) for e in plan.events]
    # The `complete` rows of parents whose last children this event counts: due now, leased with its calls.
    due = owner = until = None
    if plan.counted:
        due = st.time_in(plan.now)
        if lease is not None:
            owner, until = lease.owner, st.time_in(lease.until)
    counted = [{"node_id": parent_id, "root_id": root_id} for parent_id, root_id in plan.counted]
    completed: list[str] = []
    if st.write_all is not None:
        # PostgreSQL: every change of the event in one statement, one round trip. The node UPDATE is what the
        # statement's main query reads (it runs first, its rows locked in id order); the work and history
        # changes run after it. A node changed meanwhile aborts the whole statement (SerializationError).
        moves, look = _slot_moves(plan) if plan.released or plan.parked else ([], [])
        if node_rows or drop or beats or work_rows or event_rows or finished or new_nodes or moved or counted:
            values = {"drop": drop or None, "beats": beats or None, "expected": len(node_rows),
                      "b_due": due, "b_owner": owner, "b_until": until}
            # Each group's rows as they are (sent as one JSON parameter each); NULL for a group with none.
            for group, rows in (("i_", new_nodes), ("c_", new_counters), ("n_", node_rows), ("w_", work_rows),
                                ("e_", event_rows), ("f_", finished), ("s_", moves), ("m_", moved),
                                ("b_", counted)):
                values[group] = rows or None
            ((_, done),) = yield Fetch(st.write_all, values)
            completed = list(done or ())
        if st.wake_waiters is not None:
            for step_id, limit, count in look:  # after the commit (the write above committed by itself, as a rule)
                yield Exec(st.wake_waiters, {"step_id": step_id, "limit": limit, "count": count})
        return completed
    for parent_id, root_id in sorted(plan.counted):  # counted one by one, each parent's counter once a child
        ((done, n_children, _),) = yield Fetch(st.bump_count, {"parent_id": parent_id})
        if done == n_children:
            completed.append(parent_id)
            work_rows.append({"kind": "complete", "node_id": parent_id, "root_id": root_id, "attempt": 0,
                              "due_at": due, "lease_owner": owner, "lease_until": until})
    if drop:
        yield ExecMany(st.drop_work, [{"node_id": i} for i in drop])
    if beats:
        yield ExecMany(st.drop_heartbeats, [{"node_id": i} for i in beats])
    if work_rows:
        yield ExecMany(st.insert_work, work_rows)
    if event_rows:
        yield ExecMany(st.insert_event, event_rows)
    if finished:
        yield ExecMany(st.finish_call, finished)
    return completed


def _claim(req: Claim, st: Statements) -> Generator[Op, Any, ClaimResult]:
    until = req.now + timedelta(seconds=req.lease_s)
    rows = yield Fetch(st.claim, {"now": st.time_in(req.now), "limit": req.limit, "owner": req.owner,
                                  "until": st.time_in(until)})
    nodes: dict[str, Node] = {}
    calls = [node_id for kind, node_id, *_ in rows if kind == "dispatch"]
    if calls and st.dialect == "postgresql":
        nodes = {n.id: n for n in map(st.node, (yield Fetch(st.nodes_by_id, {"ids": calls})))}
    else:
        for node_id in calls:
            nodes.update((n.id, n) for n in map(st.node, (yield Fetch(st.nodes_by_id, {"ids": node_id}))))
    claimed = [ClaimedWork(Work(kind, node_id, root_id, attempt, st.time_out(due_at)),  # type: ignore[arg-type]
                           nodes.get(node_id) if kind == "dispatch" else None)
               for kind, node_id, root_id, attempt, due_at in rows]
    if len(rows) == req.limit:
        return ClaimResult(claimed)  # the worker claims again at once: when the next row is due can wait
    ((unleased, leased),) = yield Fetch(st.next_due, {})
    return ClaimResult(claimed, min(filter(None, (st.time_out(unleased), st.time_out(leased))), default=None))
