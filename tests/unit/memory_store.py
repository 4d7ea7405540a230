"""An in-memory stand-in for the store, driving the pure decide handlers exactly as the engine does."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Generator
from datetime import UTC, datetime, timedelta
from typing import Any

from aetr.domain import decide
from aetr.domain.flow import build_run_nodes, insert
from aetr.domain.runs import Node, Plan, Work
from aetr.domain.steps import StepTree

Script = Callable[[list[Any]], Any]


class MemoryStore:
    """Committed run nodes in a dict; each event runs in a fresh Plan like a transaction."""

    def __init__(self, scripts: dict[str, Script] | None = None, count_later: bool = False,
                 defer_counts: bool = False, batch: int = 1000) -> None:
        self.batch = batch  # item subtrees a map makes per event
        self.items: dict[str, list[Any]] = {}
        self.count_later = count_later  # as on PostgreSQL: children counted by the commit, parents completed after
        # parents whose children are all counted wait for complete_pending(), as when the process is slow or dies
        self.defer_counts = defer_counts
        self.nodes: dict[str, Node] = {}
        self.done: dict[str, int] = {}
        self.failed: dict[str, int] = {}
        self.next_item: dict[str, int] = {}
        self.work: list[Work] = []
        self.scripts = scripts or {}
        self.now = datetime(2026, 1, 1, tzinfo=UTC)
        self._ids = itertools.count()

    def _new_id(self) -> str:
        return f"n{next(self._ids)}"

    def start(self, tree: StepTree, run_input: Any) -> str:
        """Create and start a run; return its id."""
        nodes = build_run_nodes(tree, run_input, self.now, self._new_id)
        # As in the engine, the new run's nodes are written by the start event's commit, not before it.
        plan = Plan(now=self.now, new_id=self._new_id, batch=self.batch)
        insert(plan, nodes)
        plan.whole_run = True
        self._drive(plan, decide.start_run(plan, nodes[0].id))
        return nodes[0].id

    def event(self, node_id: str, handler: Callable[[Plan], Generator[Any, Any, Any]]) -> Any:
        """Run one event handler on a plan seeded with the node and its ancestors."""
        self.now += timedelta(milliseconds=1)
        plan = Plan(now=self.now, count_later=self.count_later, new_id=self._new_id, batch=self.batch)
        chain = []
        cur: str | None = node_id
        while cur is not None:
            chain.append(self.nodes[cur])
            cur = self.nodes[cur].parent_id
        plan.absorb(chain)
        return self._drive(plan, handler(plan))

    def children(self, parent_id: str) -> list[Node]:
        """A parent's committed children in order."""
        return sorted((n for n in self.nodes.values() if n.parent_id == parent_id), key=lambda n: n.position)

    def _subtree(self, node_id: str) -> list[Node]:
        out = [self.nodes[node_id]]
        for kid in self.children(node_id):
            out.extend(self._subtree(kid.id))
        return out

    def _drive(self, plan: Plan, gen: Generator[Any, Any, Any]) -> Any:
        pending_done: dict[str, int] = {}
        pending_failed: dict[str, int] = {}
        pending_next: dict[str, int] = {}
        pending_items: dict[str, list[Any] | None] = {}
        answer: Any = None
        while True:
            try:
                req = gen.send(answer)
            except StopIteration as stop:
                result = stop.value
                break
            if isinstance(req, decide.LoadChildren):
                answer = self.children(req.parent_id)
            elif isinstance(req, decide.LoadChild):
                kids = self.children(req.parent_id)
                answer = kids[req.position] if req.position < len(kids) else None
            elif isinstance(req, decide.KeepItems):
                pending_items[req.node_id] = req.items
                answer = None
            elif isinstance(req, decide.LoadItems):
                answer = self.items.get(req.node_id)
            elif isinstance(req, decide.ReadNextItem):
                answer = pending_next.get(req.node_id, self.next_item.get(req.node_id, 0))
            elif isinstance(req, decide.TakeSlot):  # the order of waiting attempts is left to the engine's tests
                held = sum(1 for n in self.nodes.values() if n.holds_slot and n.step.id == req.step_id)
                answer = held + req.earlier < req.limit
            elif isinstance(req, decide.Park):
                answer = None
            elif isinstance(req, decide.LoadSubtree):
                answer = self._subtree(req.node_id)
            elif isinstance(req, decide.BumpDone):
                pending_done[req.parent_id] = pending_done.get(req.parent_id, self.done.get(req.parent_id, 0)) + 1
                answer = pending_done[req.parent_id]
            elif isinstance(req, decide.BumpFailed):
                pending_failed[req.parent_id] = pending_failed.get(req.parent_id,
                                                                   self.failed.get(req.parent_id, 0)) + 1
                answer = pending_failed[req.parent_id]
            elif isinstance(req, decide.NextItem):
                answer = pending_next.get(req.parent_id, self.next_item.get(req.parent_id, 0))
                pending_next[req.parent_id] = answer + 1
            elif isinstance(req, decide.SetDone):
                pending_done[req.parent_id] = req.value
                pending_failed[req.parent_id] = req.failed
                pending_next[req.parent_id] = req.next_item
                answer = None
            elif isinstance(req, decide.RunScript):
                try:
                    answer = decide.ScriptResult(value=self.scripts[req.source](req.args))
                except Exception as exc:  # the stand-in sandbox reports any failure as the script's message
                    answer = decide.ScriptResult(error=str(exc))
            else:  # pragma: no cover - a new request type must be taught here
                raise AssertionError(req)
        # Commit: new nodes are inserted; optimistic versions must match what is stored.
        for node in plan.created:
            assert node.id not in self.nodes
            self.nodes[node.id] = node
        for node in plan.changed:
            assert self.nodes[node.id].version == plan.loaded_versions[node.id], "lost update"
            self.nodes[node.id] = node
        for node_id, c in plan.counters.items():
            self.done[node_id], self.failed[node_id], self.next_item[node_id] = c.done, c.failed, c.next_item
            if c.items is not None:
                self.items[node_id] = c.items
        for node_id, items in pending_items.items():
            if items is None:
                self.items.pop(node_id, None)
            else:
                self.items[node_id] = items
        self.done.update(pending_done)
        self.failed.update(pending_failed)
        self.next_item.update(pending_next)
        self.work = [w for w in self.work if w.node_id not in plan.drop_work_for
                     and not (w.kind == "heartbeat" and w.node_id in plan.drop_heartbeats_for)] + plan.work
        completes = []
        for parent_id, root_id in plan.counted:  # counted by the commit; the last count stores a `complete` row
            self.done[parent_id] = self.done.get(parent_id, 0) + 1
            if self.done[parent_id] == self.nodes[parent_id].n_children:
                completes.append(Work("complete", parent_id, root_id, 0, self.now))
        self.work += completes
        if not self.defer_counts:
            self.complete_pending(completes)  # right after the commit
        return result

    def grows(self) -> list[Work]:
        """Batches of map items still to be made into nodes."""
        return [w for w in self.work if w.kind == "grow"]

    def grow(self, row: Work) -> decide.Verdict:
        """Make a batch of a map's items into nodes (as the worker does once the row is due)."""
        self.work.remove(row)
        verdict: decide.Verdict = self.event(row.node_id, lambda plan: decide.grow_map(plan, row.node_id, row.attempt))
        return verdict

    def timers(self) -> list[Work]:
        """Timed waits whose timer is armed."""
        return [w for w in self.work if w.kind == "timer"]

    def fire(self, timer: Work) -> decide.Verdict:
        """A timer's time came (as the worker performs it once it is due)."""
        self.work.remove(timer)
        verdict: decide.Verdict = self.event(
            timer.node_id, lambda plan: decide.timer_fired(plan, timer.node_id, timer.attempt))
        return verdict

    def complete_pending(self, rows: list[Work] | None = None) -> int:
        """Perform `complete` work rows (all pending ones by default), as the engine does after the commit that
        counted a parent's last child: the parent completes in an event of its own."""
        rows = [w for w in self.work if w.kind == "complete"] if rows is None else rows
        for row in rows:
            if row not in self.work:
                continue  # dropped meanwhile (a redrive reset the counter)
            self.work.remove(row)
            self.event(row.node_id, lambda p, parent_id=row.node_id: decide.children_done(p, parent_id))
        return len(rows)
