"""The coordinator: each event in one transaction — load, decide, write the changes and the work they imply."""

from __future__ import annotations

import logging
import random
import uuid
from collections.abc import Callable, Generator
from datetime import UTC, datetime
from typing import Any, Protocol

from aetr.domain import decide
from aetr.domain.jsonvalue import check_json
from aetr.domain.runs import Plan, build_run_nodes
from aetr.domain.steps import StepTree
from aetr.engine import metrics
from aetr.store import Conflict, Store, Tx
from aetr.store.store import is_integrity_error

log = logging.getLogger("aetr.engine")

MAX_CONFLICT_RETRIES = 50  # an event that loses this many races in a row is a bug, not contention

Handler = Callable[[Plan], Generator[decide.Request, Any, Any]]


class ScriptRunner(Protocol):
    """What the coordinator needs of the sandbox."""

    async def acall(self, source: str, args: list[Any]) -> Any: ...


def utcnow() -> datetime:
    """The current time, timezone-aware UTC."""
    return datetime.now(UTC)


class Coordinator:
    """Turns outside events (a run started, a callback, a deadline, a cancel) into committed state changes."""

    def __init__(self, store: Store, scripts: ScriptRunner, script_error: type[Exception]) -> None:
        self.store = store
        self.scripts = scripts
        self.script_error = script_error
        self.conflicts = 0  # optimistic-lock retries so far: the contention test reads it
        self.on_commit: list[Callable[[set[str]], None]] = []  # told the runs each commit changed

    async def start_run(self, tree: StepTree, run_input: Any, idempotency_key: str | None) -> tuple[bool, str]:
        """Freeze `tree` into a new run and start it; (created, run id). A known key returns its run."""
        nodes = build_run_nodes(tree, run_input, utcnow(), lambda: str(uuid.uuid4()))
        root_id = nodes[0].id
        plan = Plan(now=nodes[0].created_at)
        plan.absorb(nodes, children_of=[n.id for n in nodes])
        plan.whole_run = True
        try:
            async with self.store.transaction() as tx:
                if idempotency_key is not None:
                    existing = await tx.find_run_by_key(idempotency_key)
                    if existing is not None:
                        return False, existing
                done: dict[str, int] = {}
                await self._drive(tx, plan, decide.start_run(plan, root_id), fresh_counts=done)
                # The nodes are new: write them once, in their started state, not insert-then-update.
                final = [plan.nodes[n.id] for n in nodes]
                await tx.insert_run(final, tree.to_json(), idempotency_key, done)
                await tx.apply(plan, inserted=True)
            self._committed(plan)
            metrics.RUNS_STARTED.inc()
        except Exception as exc:
            # Two requests with one new key raced: the loser answers with the winner's run.
            if idempotency_key is None or not is_integrity_error(exc):
                raise
            existing = await self.store.find_run_by_key(idempotency_key)
            if existing is None:
                raise
            return False, existing
        return True, root_id

    async def step_succeeded(self, node_id: str, attempt: int, output: Any, source: str) -> decide.Verdict:
        """A step reported its output (`source`: "callback" or "sync")."""
        return await self._event(node_id, lambda plan: decide.step_succeeded(plan, node_id, attempt, output),
                                 source, attempt)

    async def attempt_failed(self, node_id: str, attempt: int, message: str, kind: str, retryable: bool,
                             source: str, retry_after_s: float | None = None) -> decide.Verdict:
        """A step's attempt failed (its /fail callback, or its HTTP answer)."""
        return await self._event(
            node_id,
            lambda plan: decide.attempt_failed(plan, node_id, attempt, message, kind, retryable, retry_after_s),
            source, attempt)

    async def deadline_passed(self, node_id: str, attempt: int, heartbeat: bool = False) -> decide.Verdict:
        """An attempt's deadline, or its heartbeat deadline, passed."""
        return await self._event(
            node_id, lambda plan: decide.deadline_passed(plan, node_id, attempt, heartbeat), None, attempt)

    async def heartbeat(self, node_id: str, attempt: int) -> decide.Verdict:
        """A step's heartbeat: its heartbeat deadline starts again."""
        return await self._event(node_id, lambda plan: decide.heartbeat(plan, node_id, attempt),
                                 "callback.heartbeat", attempt)

    async def cancel(self, root_id: str) -> decide.Verdict:
        """Cancel every unfinished node of a run."""
        return await self._event(root_id, lambda plan: decide.cancel_run(plan, root_id), None, 0)

    async def redrive(self, root_id: str) -> decide.Verdict:
        """Run a failed or cancelled run's unfinished nodes again."""
        return await self._event(root_id, lambda plan: decide.redrive(plan, root_id), None, 0)

    async def _event(self, node_id: str, handler: Handler, source: str | None, attempt: int) -> decide.Verdict:
        for _ in range(MAX_CONFLICT_RETRIES):
            try:
                async with self.store.transaction() as tx:
                    plan = Plan(now=utcnow(), jitter=random.random())
                    chain = await tx.load_chain(node_id)
                    if not chain:
                        return decide.Verdict("unknown", "no such node")
                    plan.absorb(chain)
                    verdict: decide.Verdict = await self._drive(tx, plan, handler(plan))
                    if source is not None:
                        data: dict[str, Any] = {"attempt": attempt, "outcome": verdict.outcome}
                        if verdict.reason:
                            data["reason"] = verdict.reason
                        plan.event(plan.nodes[node_id], source, data)
                    await tx.apply(plan)
                self._committed(plan)
                if source is not None:
                    metrics.REPORTS.labels(source, verdict.outcome).inc()
                return verdict
            except Conflict:
                self.conflicts += 1
                metrics.CONFLICTS.inc()
        raise RuntimeError(f"node {node_id}: gave up after {MAX_CONFLICT_RETRIES} conflicting updates")

    def _committed(self, plan: Plan) -> None:
        roots = {n.root_id for n in plan.changed}
        if roots:
            for listener in self.on_commit:
                listener(roots)

    async def _drive(self, tx: Tx, plan: Plan, gen: Generator[decide.Request, Any, Any],
                     fresh_counts: dict[str, int] | None = None) -> Any:
        """Run a decide handler, answering its requests from the database and the sandbox."""
        answer: Any = None
        while True:
            try:
                req = gen.send(answer)
            except StopIteration as stop:
                return stop.value
            if isinstance(req, decide.LoadChildren):
                answer = await tx.load_children(req.parent_id)
            elif isinstance(req, decide.LoadChild):
                answer = await tx.load_child(req.parent_id, req.position)
            elif isinstance(req, decide.BumpDone):
                if fresh_counts is not None:  # a run being created: its rows are not written yet
                    fresh_counts[req.parent_id] = answer = fresh_counts.get(req.parent_id, 0) + 1
                else:
                    answer = await tx.bump_done(req.parent_id)
            elif isinstance(req, decide.SetDone):
                await tx.set_done(req.parent_id, req.value)
                answer = None
            elif isinstance(req, decide.LoadSubtree):
                answer = await tx.load_subtree(req.node_id)
            else:
                answer = await self._script(req)

    async def _script(self, req: decide.RunScript) -> decide.ScriptResult:
        try:
            value = await self.scripts.acall(req.source, req.args)
        except self.script_error as exc:
            return decide.ScriptResult(error=str(getattr(exc, "message", exc)))
        try:
            return decide.ScriptResult(value=check_json(value))
        except ValueError as exc:
            return decide.ScriptResult(error=f"the script returned a value that cannot be stored: it {exc}")

