"""The coordinator: each event in one transaction — load, decide, write the changes and the work they imply."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import time
from collections import Counter
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from aetr.domain import decide
from aetr.domain.decide import ACCEPTED
from aetr.domain.flow import build_run_nodes, insert
from aetr.domain.jsonvalue import MAX_TREE_DEPTH, check_json
from aetr.domain.kinds import api
from aetr.domain.runs import Node, Plan, Work, evolve
from aetr.domain.steps import DEFAULT_MAX_TREE_NODES, TreeTooBig
from aetr.engine import metrics, tracing
from aetr.engine.outage import OUTAGE, is_outage
from aetr.store import ClaimedWork, Conflict, NeedsScripts, Store
from aetr.store.sql import (
    Apply,
    Chain,
    CountChild,
    FindRunByKey,
    FinishCall,
    FinishCalls,
    InsertRun,
    Lease,
    LoadChain,
    LoadTree,
    NextWaiting,
    PendingCall,
    Postpone,
    Program,
    WorkDue,
    single,
)
from aetr.store.store import ScriptAnswers, is_integrity_error

log = logging.getLogger("aetr.engine")

# A generator of the engine's own, not the random module's shared one: an application (or a test) that embeds
# AETR keeps its random sequence whatever AETR draws meanwhile.
_RANDOM = random.Random()
MAX_CONFLICT_RETRIES = 50  # an event that loses this many races in a row is a bug, not contention
# Each pass of an event that stops for scripts runs at least one more of them, and a script waits only for the
# ones above it in the tree: more passes than the deepest tree allows is a bug.
MAX_SCRIPT_PASSES = MAX_TREE_DEPTH + 16

Handler = Callable[[Plan], Generator[decide.Request, Any, Any]]


class ScriptRunner(Protocol):
    """What the coordinator needs of the sandbox."""

    async def acall(self, source: str, args: list[Any]) -> Any: ...


class CallSink(Protocol):
    """Who performs work right after the commit that created it (the worker)."""

    owner: str
    lease_s: float
    direct_limit: int  # calls one event may hand over at most; the rest wait in the table to be claimed

    def perform(self, calls: list[ClaimedWork]) -> None: ...

    def room(self) -> int:
        """How many more calls this process can make at once now."""
        ...

    def due(self, at: datetime) -> None: ...


IDS_PER_DRAW = 64  # ids made from one read of the system's randomness
ANSWER_FLUSH_S = 0.01  # seconds a dispatch answer may wait to be written with others (or with its callback)
# Seconds a step's report waits at most for the answer to its call while that call is still under way, when
# calls are made in a call process (engine.calls): the 202 comes the longer way round, and the report often
# reaches this process first. The history keeps the order of cause and effect.
ANSWER_WAIT_S = 0.05


def time_ordered_ids() -> Iterator[str]:
    """New ids, UUIDv7 (RFC 9562): the millisecond they were first asked for in their first 48 bits, then 74
    random bits.

    A run's ids sort together, so its rows sit side by side in every index keyed by them (nodes, parents,
    work, history), where uuid4's scatter over random pages: fewer pages to change and write per commit.
    """
    ms = time.time_ns() // 1_000_000
    while True:
        pool = os.urandom(10 * IDS_PER_DRAW)  # one system call for many ids, not one each
        for i in range(0, len(pool), 10):
            r = int.from_bytes(pool[i:i + 10], "big")
            h = f"{ms << 80 | 0x7 << 76 | (r >> 62 & 0xFFF) << 64 | 0b10 << 62 | r & 0x3FFF_FFFF_FFFF_FFFF:032x}"
            yield f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def utcnow() -> datetime:
    """The current time, timezone-aware UTC."""
    return datetime.now(UTC)


def replaying(drawn: list[str], source: Iterator[str]) -> Callable[[], str]:
    """New ids from `source`, recorded in `drawn`: a program run again draws the same ids in the same order."""
    position = 0

    def next_id() -> str:
        nonlocal position
        if position == len(drawn):
            drawn.append(next(source))
        position += 1
        return drawn[position - 1]

    return next_id


@dataclass(frozen=True)
class Started:
    """What starting a run did: `created` false for a known idempotency key (and for an unknown step, where
    `run_id` is empty, or a refused one, with `refused` saying why); `plan` holds every node of a created run as
    committed."""

    created: bool
    run_id: str
    plan: Plan | None = None
    refused: str = ""


@dataclass
class Outcome:
    """What an event's program committed: the verdict, the plan, and the calls this process leased."""

    verdict: decide.Verdict
    plan: Plan | None = None
    calls: list[ClaimedWork] = field(default_factory=list)
    created: bool = True
    run_id: str = ""


class Coordinator:
    """Turns outside events (a run started, a callback, a deadline, a cancel) into committed state changes.

    Each event is a program (aetr.store.sql) the store runs in one transaction: read the node's chain, decide,
    write. The calls a commit starts are leased to this process in that same transaction and handed to the
    worker right after the commit, with no claim round trip.
    """

    def __init__(self, store: Store, scripts: ScriptRunner, script_error: type[Exception],
                 max_tree_nodes: int = DEFAULT_MAX_TREE_NODES) -> None:
        self.store = store
        self.max_tree_nodes = max_tree_nodes
        self.scripts = scripts
        self.script_error = script_error
        self.conflicts = 0  # optimistic-lock retries so far: the contention test reads it
        self.on_commit: list[Callable[[set[str]], None]] = []  # told the runs each commit changed
        self.sink: CallSink | None = None
        # PostgreSQL counts a parallel parent's finished children in the write of the event (see Plan.count_later)
        self.count_later = store.dialect == "postgresql"
        self._answered: dict[str, FinishCall] = {}  # dispatch answers not yet written, by node id
        # Callback-mode calls under way, by node id, when a call process makes calls: resolved once their answer
        # has been handled.
        self.answers_coming: dict[str, asyncio.Future[None]] = {}
        self._flush: asyncio.TimerHandle | None = None
        self._flushes: set[asyncio.Task[None]] = set()

    async def start_run(self, step: str, run_input: Any, idempotency_key: str | None,
                        notify: str | None = None, traceparent: str | None = None) -> Started:
        """Freeze the tree of `step` (a name or id) into a new run and start it, in one transaction.

        A known idempotency key answers with its run (not created); an unknown step with no run at all.
        `notify` (a URL the caller checked) is told of the run's end with a CloudEvent; a run traced (when
        tracing is on) is a child of the span a valid W3C `traceparent` names.
        """
        # The run's ids and time are drawn once: a program run again (for its scripts) builds the same run,
        # so its mappers are asked the same (`ctx.run.id`) and their answers serve.
        ids: list[str] = []
        source, now = time_ordered_ids(), utcnow()
        try:
            out: Outcome = await self._run_with_scripts(
                lambda: self._start_program(step, run_input, idempotency_key, now, replaying(ids, source),
                                            notify, traceparent),
                ScriptAnswers(self._script), start=True)
        except Exception as exc:
            # Two requests with one new key raced: the loser answers with the winner's run.
            if idempotency_key is None or not is_integrity_error(exc):
                raise
            existing = await self.store.find_run_by_key(idempotency_key)
            if existing is None:
                raise
            return Started(False, existing)
        refused = out.verdict.reason if out.verdict.outcome == "refused" else ""
        return Started(out.created, out.run_id, out.plan, refused)

    def _start_program(self, step: str, run_input: Any, key: str | None, now: datetime,
                       new_id: Callable[[], str], notify: str | None = None,
                       traceparent: str | None = None) -> Program:
        if key is not None:
            existing = yield FindRunByKey(key)
            if existing is not None:
                return Outcome(ACCEPTED, created=False, run_id=existing)
        tree = yield LoadTree(step)
        if tree is None:
            return Outcome(decide.Verdict("unknown", f"no step named (or with id) '{step}'"), created=False)
        if tree.node_count > self.max_tree_nodes:
            # Stored under a higher limit (lowered since, or another process's): counted on the tree as read,
            # whose reused subtrees are shared, so nothing is built to refuse it.
            too_big = TreeTooBig(tree.config.name, tree.node_count, self.max_tree_nodes, changed=False)
            return Outcome(decide.Verdict("refused", str(too_big)), created=False)
        nodes = build_run_nodes(tree, run_input, now, new_id)
        if notify is not None:
            nodes[0] = evolve(nodes[0], {"notify": notify})
        if tracing.TRACER is not None:
            nodes[0] = evolve(nodes[0], {"trace": tracing.new_run(nodes[0].id, traceparent)})
        root_id = nodes[0].id
        plan = Plan(now=nodes[0].created_at, new_id=new_id, max_nodes=self.max_tree_nodes)
        insert(plan, nodes)
        plan.whole_run = True
        yield from decide.start_run(plan, root_id)
        # The nodes are new: write them once, in their started state, not insert-then-update.
        lease, calls = self._lease(plan)
        new_run = InsertRun(tree.snapshot_text, key)
        yield Apply(plan, lease=lease, new_run=new_run)
        return Outcome(ACCEPTED, plan, calls, run_id=root_id)

    async def step_succeeded(self, node_id: str, attempt: int, output: Any, source: str) -> decide.Verdict:
        """A step reported its output (`source`: "callback" or "sync")."""
        return await self._event(node_id, lambda plan: decide.step_succeeded(plan, node_id, attempt, output),
                                 source, attempt, said={"report": "output"})

    async def attempt_failed(self, node_id: str, attempt: int, message: str, kind: str, retryable: bool,
                             source: str, retry_after_s: float | None = None) -> decide.Verdict:
        """A step's attempt failed (its /fail callback, or its HTTP answer)."""
        return await self._event(
            node_id,
            lambda plan: decide.attempt_failed(plan, node_id, attempt, message, kind, retryable, retry_after_s),
            source, attempt, said={"report": "failure", "error": message})

    async def deadline_passed(self, node_id: str, attempt: int, heartbeat: bool = False) -> decide.Verdict:
        """An attempt's deadline, or its heartbeat deadline, passed; its work row goes in the same transaction.

        A deadline counts from the call: while the attempt's call is still to be made (a process died after
        committing it, or calls queue for a connection), the deadline moves on instead of failing an attempt
        that never reached the step.
        """
        row = FinishCall(node_id, attempt, "heartbeat" if heartbeat else "deadline")
        return await self._event(
            node_id, lambda plan: decide.deadline_passed(plan, node_id, attempt, heartbeat), None, attempt, row)

    async def heartbeat(self, node_id: str, attempt: int) -> decide.Verdict:
        """A step's heartbeat: its heartbeat deadline starts again."""
        return await self._event(node_id, lambda plan: decide.heartbeat(plan, node_id, attempt),
                                 "callback.heartbeat", attempt)

    async def timer_fired(self, node_id: str, attempt: int) -> decide.Verdict:
        """A wait's timer came due; its work row goes in the same transaction."""
        verdict = await self._event(node_id, lambda plan: decide.timer_fired(plan, node_id, attempt), None,
                                    attempt, FinishCall(node_id, attempt, "timer"))
        if verdict.outcome == "accepted":
            metrics.WAITS_ENDED.labels("timer").inc()
        return verdict

    async def offer_slot(self, node_id: str, attempt: int) -> decide.Verdict:
        """A queued attempt of a step with max_concurrency came due: it takes a slot, or waits set aside."""
        verdict = await self._event(node_id, lambda plan: api.slot_offered(plan, node_id, attempt), None,
                                    attempt)
        if verdict.reason == api.NO_SLOT:
            metrics.SLOT_WAITS.inc()
        return verdict

    async def grow_map(self, node_id: str, first: int) -> decide.Verdict:
        """The next batch of a map's items becomes nodes; its work row goes in the same transaction."""
        verdict = await self._event(node_id, lambda plan: decide.grow_map(plan, node_id, first), None, first,
                                    FinishCall(node_id, first, "grow"))
        if verdict.outcome == "accepted":
            metrics.MAP_BATCHES.inc()
        return verdict

    async def signal(self, node_id: str, output: Any, error: str | None) -> decide.Verdict:
        """Someone answered a signal wait, with an output or an error."""
        verdict = await self._event(node_id, lambda plan: decide.signalled(plan, node_id, output, error), "signal",
                                    0)
        if verdict.outcome == "accepted":
            metrics.WAITS_ENDED.labels("signal").inc()
        return verdict

    async def cancel(self, root_id: str) -> decide.Verdict:
        """Cancel every unfinished node of a run."""
        return await self._event(root_id, lambda plan: decide.cancel_run(plan, root_id), None, 0)

    async def redrive(self, root_id: str) -> decide.Verdict:
        """Run a failed or cancelled run's unfinished nodes again."""
        return await self._event(root_id, lambda plan: decide.redrive(plan, root_id), None, 0)

    async def count_child(self, parent_id: str, position: int, owner: str, lease_s: float) -> bool:
        """Count a finished child of a parallel parent (a `count` work row). The last count also stores a
        `complete` row for the parent, leased to `owner`: True when the caller should now complete it."""
        now = utcnow()
        self.store.ran_work()
        last: bool = await self.store.run(
            single(CountChild(parent_id, position, now, owner, now + timedelta(seconds=lease_s))))
        return last

    async def complete_parent(self, parent_id: str) -> decide.Verdict:
        """Every child of a parallel parent was counted: complete it (its `complete` row goes in the same commit)."""
        return await self._event(parent_id, lambda plan: decide.children_done(plan, parent_id), None, 0,
                                 FinishCall(parent_id, 0, "complete"))

    def call_answered(self, call: FinishCall) -> None:
        """A callback-mode step accepted its call: forget the call's row and record the answer, soon.

        Written with the step's own callback when that comes first (so history keeps its order), else with the
        other answers of the next few milliseconds in one transaction.
        """
        self._answered[call.node_id] = call
        if self._flush is None:
            self._flush = asyncio.get_running_loop().call_later(ANSWER_FLUSH_S, self._start_flush)

    def _start_flush(self) -> None:
        self._flush = None
        calls, self._answered = list(self._answered.values()), {}
        if calls:
            task = asyncio.create_task(self._write_answers(calls))
            self._flushes.add(task)
            task.add_done_callback(self._flushes.discard)

    async def _write_answers(self, calls: list[FinishCall]) -> None:
        for _ in range(MAX_CONFLICT_RETRIES):
            try:
                await self.store.run(single(FinishCalls(calls)))
                return
            except Conflict:
                continue
            except Exception as exc:  # the rows' leases expire and the calls are made again: at least once, never lost
                if is_outage(exc):
                    OUTAGE.failed(f"recording {len(calls)} dispatch answers", str(exc))
                else:
                    log.exception("recording %d dispatch answers failed", len(calls))
                return
        log.error("recording %d dispatch answers lost %d races in a row", len(calls), MAX_CONFLICT_RETRIES)

    async def drain(self) -> None:
        """Write the dispatch answers still held (the process is stopping)."""
        if self._flush is not None:
            self._flush.cancel()
            self._start_flush()
        if self._flushes:
            await asyncio.gather(*self._flushes, return_exceptions=True)

    async def _event(self, node_id: str, handler: Handler, source: str | None, attempt: int,
                     done: FinishCall | None = None, said: dict[str, Any] | None = None) -> decide.Verdict:
        if self.answers_coming and source is not None and source.startswith("callback") and (
                coming := self.answers_coming.get(node_id)):
            # The step reported before the answer to its call reached this process: wait a little for it, so
            # that the history says the call was answered before what the step said.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(coming), ANSWER_WAIT_S)
        answered = [c for c in (self._answered.pop(node_id, None), done) if c is not None]
        answers = ScriptAnswers(self._script)  # kept across lost races: a script's answer depends on its args only
        # Ids for the nodes the event may create (a map's items), drawn the same on every pass of the event.
        ids: list[str] = []
        source_ids = time_ordered_ids()
        for _ in range(MAX_CONFLICT_RETRIES):
            try:
                out: Outcome = await self._run_with_scripts(
                    lambda: self._program(node_id, handler, source, attempt, answered, replaying(ids, source_ids),
                                          said),
                    answers)
            except Conflict:
                self.conflicts += 1
                metrics.CONFLICTS.inc()
                continue
            if source is not None:
                metrics.report(source, out.verdict.outcome)
            return out.verdict
        raise RuntimeError(f"node {node_id}: gave up after {MAX_CONFLICT_RETRIES} conflicting updates")

    async def _run_with_scripts(self, program: Callable[[], Program], answers: ScriptAnswers,
                                start: bool = False) -> Any:
        """Run an event's program; when the store stops it for scripts (SQLite's writer runs none), run them
        here, outside any transaction, and the event again from the start, new program, same answers."""
        self.store.ran_work()
        for _ in range(MAX_SCRIPT_PASSES):
            try:
                return await self.store.run(program(), answers, self._committed, start)
            except NeedsScripts as need:
                await answers.run_all(need.requests)
        raise RuntimeError(f"an event still asked for new scripts after {MAX_SCRIPT_PASSES} passes")

    def _program(self, node_id: str, handler: Handler, source: str | None, attempt: int,
                 answered: list[FinishCall], new_id: Callable[[], str],
                 said: dict[str, Any] | None = None) -> Program:
        plan = Plan(now=utcnow(), jitter=_RANDOM.random(), count_later=self.count_later, new_id=new_id,
                    max_nodes=self.max_tree_nodes)
        ends = said is not None and said.get("report") in ("output", "failure")
        chain: Chain = yield LoadChain(node_id, ends_attempt=ends, now=plan.now)
        if not chain.nodes:
            return Outcome(decide.Verdict("unknown", "no such node"))
        plan.absorb(chain.nodes)
        deadline = next((c for c in answered if c.kind in ("deadline", "heartbeat")), None)
        call = next((c for c in answered if c.kind == "dispatch"), None)
        if deadline is not None and call is None:
            postponed = yield from _postpone_unsent(plan, plan.nodes[node_id], deadline)
            if postponed:
                return Outcome(decide.Verdict("refused", "the attempt's call was not made yet"))
        elif deadline is not None and call is not None:
            moved = call.deadline_at if deadline.kind == "deadline" else call.heartbeat_at
            if moved is not None and moved > plan.now:
                # The call, made late, was answered just now (its answer held here): its deadline counts from
                # the call. Record the answer and move the deadline, and leave the attempt be.
                plan.events[:0] = [call.record] if call.record is not None else []
                yield Apply(plan, finished=[call])
                return Outcome(decide.Verdict("refused", "the attempt's call was made late: its deadline counts "
                                                         "from the call"))
        before = len(plan.events)
        verdict: decide.Verdict = yield from _answering(handler(plan), _sibling_reader(chain.following))
        if source is not None:
            # What was reported (an output, a failure and its message) and what became of it, listed before the
            # changes it caused: history keeps the order things happened in.
            data: dict[str, Any] = {"attempt": attempt, **(said or {}), "outcome": verdict.outcome}
            if verdict.reason:
                data["reason"] = verdict.reason
            plan.event(plan.nodes[node_id], source, data)
            plan.events.insert(before, plan.events.pop())
        # The call's answer goes first in its history; its row goes last, after the nodes' rows are locked in
        # id order like every other event's (taking a work row's lock first could deadlock with them).
        plan.events[:0] = [c.record for c in answered if c.record is not None]
        yield from _hand_slots_on(plan)
        forgotten = [FinishCall(node, attempt, kind) for kind, node, attempt in plan.forget]
        lease, calls = self._lease(plan)
        completed: list[str] = yield Apply(plan, lease=lease, finished=[*answered, *forgotten])
        if completed and lease is not None:  # their children all counted: this process completes them now
            roots = dict(plan.counted)
            calls += [ClaimedWork(Work("complete", parent, roots[parent], 0, plan.now)) for parent in completed]
        return Outcome(verdict, plan, calls)

    def _lease(self, plan: Plan) -> tuple[Lease | None, list[ClaimedWork]]:
        """The calls due now that this process makes right after the commit, leased to it there; and the lease of
        the `complete` rows of parents whose last children this event counts."""
        sink = self.sink
        if sink is None or not (plan.work or plan.counted):
            return None, []
        # A call handed a freed slot is made here only while this process has room for it; beyond that, it is
        # claimed by whichever worker has: the process that frees slots fastest would otherwise take on every
        # call of the step, and those waiting past their lease would be made twice.
        ready = [w for w in plan.work if w.kind == "dispatch" and w.due_at <= plan.now]
        own = [w for w in ready if w.node_id not in plan.handed][:sink.direct_limit]
        handed = [w for w in ready if w.node_id in plan.handed][:max(0, sink.room() - len(own))]
        now = [ClaimedWork(w, plan.nodes.get(w.node_id) if w.kind == "dispatch" else None) for w in own + handed]
        if not now and not plan.counted:
            return None, []
        until = plan.now + timedelta(seconds=sink.lease_s)
        return Lease(sink.owner, until, frozenset(_key(c.work) for c in now)), now

    def _committed(self, out: Outcome) -> None:
        """On the event loop, right after the commit: call the steps it started, wake whoever waits."""
        plan = out.plan
        if plan is None:
            return
        metrics.committed(plan)
        if tracing.TRACER is not None:
            tracing.committed(plan)
        if self.sink is not None:
            if out.calls:
                self.sink.perform(out.calls)
            leased = {_key(c.work) for c in out.calls}
            later = [w.due_at for w in plan.work if _key(w) not in leased]
            if later:
                self.sink.due(min(later))
        roots = {n.root_id for n in plan.changed}
        if roots:
            for listener in self.on_commit:
                listener(roots)

    async def _script(self, req: decide.RunScript) -> decide.ScriptResult:
        try:
            value = await self.scripts.acall(req.source, req.args)
        except self.script_error as exc:
            return decide.ScriptResult(error=str(getattr(exc, "message", exc)))
        try:
            return decide.ScriptResult(value=check_json(value))
        except ValueError as exc:
            return decide.ScriptResult(error=f"the script returned a value that cannot be stored: it {exc}")


LocalAnswer = Callable[[decide.Request], tuple[bool, Any]]  # (answered here, the answer)


def _postpone_unsent(plan: Plan, node: Node, deadline: FinishCall) -> Program:
    """Move a deadline on when its attempt's call is still to be made; True when it did."""
    if node.state != "executing" or node.attempt != deadline.attempt or node.step.kind != "api":
        return False
    made_by: datetime | None = yield PendingCall(node.id, deadline.attempt)
    if made_by is None:
        # The call was made. Made late, its answer moved this deadline to count from the call: not due yet.
        due: datetime | None = yield WorkDue(node.id, deadline.attempt, deadline.kind)
        return due is not None and due > plan.now
    spec = api.spec_of(node)
    limit = spec.heartbeat_s if deadline.kind == "heartbeat" else spec.timeout_s
    if limit is None:
        return False
    due = max(plan.now, made_by) + timedelta(seconds=limit)
    yield Postpone(deadline.kind, node.id, deadline.attempt, due)
    return True


def _hand_slots_on(plan: Plan) -> Program:
    """Give each slot this event freed to the attempt of its step that has waited longest, in this transaction:
    it is called right after the commit, with no wake-up, claim or event of its own in between."""
    for step_id, freed in Counter(step for step, _ in plan.released).items():
        # Attempts this event already changed (cancelled with their run) are passed over.
        waiting: list[Node] = yield NextWaiting(step_id, freed, plan.now, tuple(plan.loaded_versions))
        for node in waiting:
            if freed == 0:
                break
            if node.id in plan.loaded_versions:
                continue
            plan.absorb([node])
            api.hand_slot(plan, plan.nodes[node.id])
            freed -= 1
        # Then the attempts this event set aside itself, which became due after every stored one.
        for _, node_id, _ in sorted(plan.parked, key=lambda key: plan.nodes[key[1]].started_at or plan.now):
            if freed == 0:
                break
            if plan.nodes[node_id].step.id == step_id:
                api.hand_slot(plan, plan.nodes[node_id])
                freed -= 1


def _key(w: Work) -> tuple[str, str, int]:
    return w.kind, w.node_id, w.attempt


def _answering(gen: Generator[decide.Request, Any, Any], local: LocalAnswer) -> Program:
    """Run a decide handler, answering the requests `local` can answer itself and passing on the rest."""
    answer: Any = None
    while True:
        try:
            req = gen.send(answer)
        except StopIteration as stop:
            return stop.value
        known, answer = local(req)
        if not known:
            answer = yield req


def _sibling_reader(following: Node | None) -> LocalAnswer:
    """Answers a sequential parent's request for the next child with the sibling read along with the chain."""

    def local(req: decide.Request) -> tuple[bool, Any]:
        if (following is not None and isinstance(req, decide.LoadChild) and req.parent_id == following.parent_id
                and req.position == following.position):
            return True, following
        return False, None

    return local
