"""The decide function: how one event moves a run tree, with no I/O.

Each handler is a generator over a `Plan`. When it needs data it does not hold it yields a request
(`LoadChildren`, `LoadSubtree`, `BumpDone`, `RunScript`) and the driver sends back the answer, so the
same code runs against the database (engine) and against a dict (tests). Only what an event touches is
read: a callback on one child of a 10,000-wide parallel parent reads its ancestors and bumps an atomic
counter, never its 9,999 siblings.
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Literal

from aetr.domain.runs import Node, Plan, Work


@dataclass(frozen=True)
class LoadChildren:
    """Request: the children of `parent_id`, freshly read (answer: list[Node])."""

    parent_id: str


@dataclass(frozen=True)
class LoadChild:
    """Request: the child of `parent_id` at `position` (answer: Node)."""

    parent_id: str
    position: int


@dataclass(frozen=True)
class LoadSubtree:
    """Request: `node_id` and all its descendants (answer: list[Node])."""

    node_id: str


@dataclass(frozen=True)
class BumpDone:
    """Request: atomically add one to the parent's count of finished children (answer: the new count)."""

    parent_id: str


@dataclass(frozen=True)
class SetDone:
    """Request: set a parent's count of finished children (a redrive keeps the children that completed)."""

    parent_id: str
    value: int


@dataclass(frozen=True)
class RunScript:
    """Request: call a user's JavaScript with JSON args in the sandbox (answer: ScriptResult)."""

    source: str
    args: list[Any]


@dataclass(frozen=True)
class ScriptResult:
    """The answer to RunScript: a value, or the script's error message."""

    value: Any = None
    error: str | None = None


Request = LoadChildren | LoadChild | LoadSubtree | BumpDone | SetDone | RunScript
Step = Generator[Request, Any, None]


@dataclass(frozen=True)
class Verdict:
    """What a callback (or another outside report) was told."""

    outcome: Literal["accepted", "duplicate", "refused", "unknown"]
    reason: str = ""


ACCEPTED = Verdict("accepted")
MAX_RETRY_AFTER_S = 3600.0  # a step's Retry-After is honoured up to an hour


def start_run(plan: Plan, root_id: str) -> Step:
    """A new run: the root starts with the run's input (the plan holds the whole new tree)."""
    root = plan.nodes[root_id]
    plan.event(root, "run.started", {"step": root.step.name, "version": root.step.version})
    yield from _start(plan, root, root.input)


def step_succeeded(plan: Plan, node_id: str, attempt: int, output: Any) -> Generator[Request, Any, Verdict]:
    """An api step reported success (its callback, or a sync answer); the plan holds the node's ancestors."""
    node = plan.nodes[node_id]
    if node.state == "complete" and node.attempt == attempt and node.output == output:
        return Verdict("duplicate", "this result was already accepted")
    refusal = _refusal(node, attempt)
    if refusal:
        return Verdict("refused", refusal)
    node = plan.put(node, state="complete", output=output, completed_at=plan.now)
    plan.drop_work_for.add(node.id)
    yield from _after_complete(plan, node)
    return ACCEPTED


def attempt_failed(plan: Plan, node_id: str, attempt: int, message: str, kind: str, retryable: bool,
                   retry_after_s: float | None = None) -> Generator[Request, Any, Verdict]:
    """An attempt of an api step failed; it is tried again while the retry policy allows, else the node fails.

    The wait before the next attempt is full-jitter exponential backoff, capped, and never shorter than a
    `Retry-After` the step asked for.
    """
    node = plan.nodes[node_id]
    if node.state == "error" and node.attempt == attempt and (node.error or {}).get("message") == message:
        return Verdict("duplicate", "this failure was already accepted")
    refusal = _refusal(node, attempt)
    if refusal:
        return Verdict("refused", refusal)
    policy = node.step.retry
    if retryable and node.attempt - node.attempt_base < policy.max_attempts:
        delay = plan.jitter * min(policy.max_backoff_s, policy.backoff_s * 2 ** (node.attempt - 1))
        if retry_after_s is not None:
            delay = max(delay, min(retry_after_s, MAX_RETRY_AFTER_S))
        plan.event(node, "retry", {"attempt": node.attempt, "error": message, "kind": kind,
                                   "next_attempt": node.attempt + 1, "delay_s": delay})
        node = plan.put(node, attempt=node.attempt + 1)
        _arm(plan, node, delay)
        return ACCEPTED
    yield from _fail(plan, node, message, kind)
    return ACCEPTED


def deadline_passed(plan: Plan, node_id: str, attempt: int, heartbeat: bool = False,
                    ) -> Generator[Request, Any, Verdict]:
    """An attempt's deadline (or its heartbeat deadline) passed without an answer: it fails as a timeout."""
    node = plan.nodes[node_id]
    if _refusal(node, attempt):
        return Verdict("refused", "the attempt already ended")
    if heartbeat:
        limit = f"no heartbeat within heartbeat_s={node.step.heartbeat_s:g}"
        plan.event(node, "timeout", {"attempt": attempt, "heartbeat_s": node.step.heartbeat_s})
    else:
        limit = f"no answer within timeout_s={node.step.timeout_s:g}"
        plan.event(node, "timeout", {"attempt": attempt, "timeout_s": node.step.timeout_s})
    return (yield from attempt_failed(plan, node_id, attempt, limit, "timeout", True))


def heartbeat(plan: Plan, node_id: str, attempt: int) -> Generator[Request, Any, Verdict]:
    """The step says it is alive: its heartbeat deadline starts again."""
    node = plan.nodes[node_id]
    refusal = _refusal(node, attempt)
    if refusal:
        return Verdict("refused", refusal)
    if node.step.heartbeat_s is not None:
        plan.drop_heartbeats_for.add(node.id)
        plan.work.append(Work("heartbeat", node.id, node.root_id, node.attempt,
                              plan.now + timedelta(seconds=node.step.heartbeat_s)))
    return ACCEPTED
    yield  # a generator like every handler, though it needs nothing read


def cancel_run(plan: Plan, root_id: str) -> Generator[Request, Any, Verdict]:
    """Every node of the run that has not finished becomes cancelled."""
    yield from _load_run(plan, root_id)
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
    yield from _load_run(plan, root_id)
    root = plan.nodes[root_id]
    if root.state not in ("error", "cancelled"):
        return Verdict("refused", f"the run is {root.state}: only a run in error or cancelled can be retried")
    plan.event(root, "run.retried", {"from": root.state})
    yield from _resume(plan, root)
    return ACCEPTED


def _resume(plan: Plan, node: Node) -> Step:
    """Run a failed or cancelled node again from its recorded input, keeping the children that completed."""
    node = plan.put(node, state="executing", output=None, error=None, completed_at=None)
    if node.step.kind == "api":
        node = plan.put(node, attempt_base=node.attempt, attempt=node.attempt + 1)
        _arm(plan, node, 0.0)
        return
    kids = [plan.nodes[i] for i in plan.children[node.id]]
    unfinished = [k for k in kids if k.state != "complete"]
    if not unfinished:
        yield from _complete_parent(plan, node, [k.output for k in kids])
        return
    if node.step.kind == "sequential":
        first = unfinished[0]
        for later in kids[first.position + 1:]:
            yield from _reset(plan, later)
        value = kids[first.position - 1].output if first.position > 0 else node.input
        yield from _restart_child(plan, node, first, value)
        return
    plan.drop_work_for.add(node.id)  # counts still pending from before are in the new value
    yield SetDone(node.id, len(kids) - len(unfinished))
    for kid in unfinished:
        if plan.nodes[node.id].state != "executing":
            break
        yield from _restart_child(plan, node, kid, node.input)


def _restart_child(plan: Plan, parent: Node, kid: Node, value: Any) -> Step:
    """Resume a child that had its input; start afresh (mapper included) one that never got it."""
    mapper_failed = kid.error is not None and kid.error.get("kind") == "mapper" and kid.error.get("node_id") == kid.id
    if kid.started_at is not None and not mapper_failed:
        yield from _resume(plan, kid)
        return
    yield from _reset(plan, kid)
    yield from _start_child(plan, parent, plan.nodes[kid.id], value)


def _reset(plan: Plan, node: Node) -> Step:
    """Make a node and its descendants pending again, as if they had never run."""
    stack = [node.id]
    while stack:
        current = plan.nodes[stack.pop()]
        if current.state != "pending":
            plan.put(current, state="pending", input=None, output=None, error=None, started_at=None,
                     completed_at=None, attempt_base=current.attempt)
            if current.step.kind == "parallel":
                plan.drop_work_for.add(current.id)
                yield SetDone(current.id, 0)
        stack.extend(plan.children.get(current.id, ()))


def _refusal(node: Node, attempt: int) -> str:
    if node.step.kind != "api":
        return f"node is a {node.step.kind} step, not an api step"
    if node.state != "executing":
        return f"node is already {node.state}"
    if node.attempt != attempt:
        return f"attempt {attempt} was superseded by attempt {node.attempt}"
    return ""


def _load_run(plan: Plan, root_id: str) -> Step:
    """Bring the whole run into the plan (for the rare events that touch every node)."""
    if plan.whole_run:
        return
    rows: list[Node] = yield LoadSubtree(root_id)
    plan.absorb(rows, children_of=[r.id for r in rows])
    plan.whole_run = True


def _arm(plan: Plan, node: Node, delay_s: float) -> None:
    """Queue the call of the node's current attempt, its deadline, and its first heartbeat deadline."""
    at = plan.now + timedelta(seconds=delay_s)
    plan.drop_work_for.add(node.id)
    plan.work.append(Work("dispatch", node.id, node.root_id, node.attempt, at))
    plan.work.append(Work("deadline", node.id, node.root_id, node.attempt,
                          at + timedelta(seconds=node.step.timeout_s)))
    if node.step.heartbeat_s is not None:
        plan.work.append(Work("heartbeat", node.id, node.root_id, node.attempt,
                              at + timedelta(seconds=node.step.heartbeat_s)))


def _children(plan: Plan, parent: Node) -> Generator[Request, Any, list[Node]]:
    if parent.id not in plan.children:
        plan.absorb((yield LoadChildren(parent.id)), children_of=[parent.id])
    return [plan.nodes[i] for i in plan.children[parent.id]]


def _ctx(plan: Plan, node: Node, index: int) -> dict[str, Any]:
    root = plan.nodes[node.root_id]
    return {"run": {"id": root.id, "input": root.input}, "step": {"name": node.step.name}, "index": index}


def _start(plan: Plan, node: Node, value: Any) -> Step:
    """Start a node with its input: call an api step, or start a parent's first (or every) child."""
    node = plan.put(node, state="executing", input=value, started_at=plan.now, output=None, error=None)
    if node.step.kind == "api":
        node = plan.put(node, attempt=node.attempt + 1)
        _arm(plan, node, 0.0)
        return
    if node.n_children == 0:
        yield from _complete_parent(plan, node, [])
        return
    kids = yield from _children(plan, node)
    if node.step.kind == "sequential":
        yield from _start_child(plan, node, kids[0], value)
        return
    for kid in kids:
        if plan.nodes[node.id].state != "executing":
            break  # a sibling failed at once (its mapper threw): the run is over, start no more
        yield from _start_child(plan, node, kid, value)


def _start_child(plan: Plan, parent: Node, kid: Node, value: Any) -> Step:
    """Map the parent's value through the link's mapper, then start the child with it."""
    if kid.mapper is not None:
        result: ScriptResult = yield RunScript(kid.mapper, [value, _ctx(plan, kid, kid.position)])
        if result.error is not None:
            kid = plan.put(kid, started_at=plan.now)
            yield from _fail(plan, kid, result.error, "mapper")
            return
        value = result.value
    yield from _start(plan, kid, value)


def _after_complete(plan: Plan, node: Node) -> Step:
    """A node completed: its parent moves on (next child, or counts it), and completion climbs."""
    if node.parent_id is None:
        return
    parent = plan.nodes[node.parent_id]
    if parent.state != "executing":
        return
    if parent.step.kind == "sequential":
        if node.position + 1 < parent.n_children:
            # Only the next child: a long sequence must not re-read all its children at every step.
            if parent.id in plan.children:
                following = plan.nodes[plan.children[parent.id][node.position + 1]]
            else:
                following = yield LoadChild(parent.id, node.position + 1)
                plan.absorb([following])
                following = plan.nodes[following.id]
            yield from _start_child(plan, parent, following, node.output)
        else:
            parent = plan.put(parent, state="complete", output=node.output, completed_at=plan.now)
            yield from _after_complete(plan, parent)
        return
    if plan.count_later:
        plan.work.append(Work("count", parent.id, parent.root_id, node.position, plan.now))
        return
    done: int = yield BumpDone(parent.id)
    if done < parent.n_children:
        return
    if not plan.new_run:
        # Every child is done. Read them afresh: siblings may have completed in other transactions. A run being
        # started has no other transactions, and nothing written yet to read: its children are in the plan.
        plan.children.pop(parent.id, None)
    kids = yield from _children(plan, parent)
    yield from _complete_parent(plan, parent, [k.output for k in kids])


def children_done(plan: Plan, parent_id: str) -> Generator[Request, Any, Verdict]:
    """A parallel parent's counter reached its number of children (counted after their commits): complete it."""
    parent = plan.nodes[parent_id]
    if parent.state != "executing":
        return Verdict("refused", f"the parent is {parent.state}")
    plan.children.pop(parent.id, None)
    kids = yield from _children(plan, parent)
    if any(k.state != "complete" for k in kids):  # a redrive reset the counter since: it counts again
        return Verdict("refused", "not every child is complete")
    yield from _complete_parent(plan, parent, [k.output for k in kids])
    return ACCEPTED


def _complete_parent(plan: Plan, parent: Node, outputs: list[Any]) -> Step:
    """A parent whose children are all complete (or that has none) completes with its output."""
    if parent.step.kind == "sequential":
        output = parent.input
    else:
        reducer = parent.step.reducer
        if reducer in ("array", "last", "merge"):
            try:
                output = builtin_reduce(reducer, outputs)
            except ValueError as exc:
                yield from _fail(plan, parent, str(exc), "reducer")
                return
        else:
            result: ScriptResult = yield RunScript(reducer, [outputs, _ctx(plan, parent, parent.position)])
            if result.error is not None:
                yield from _fail(plan, parent, result.error, "reducer")
                return
            output = result.value
    parent = plan.put(parent, state="complete", output=output, completed_at=plan.now)
    yield from _after_complete(plan, parent)


def builtin_reduce(name: str, outputs: list[Any]) -> Any:
    """The built-in reducers: array, last, merge."""
    if name == "array":
        return list(outputs)
    if name == "last":
        return outputs[-1] if outputs else None
    merged: dict[str, Any] = {}
    for i, out in enumerate(outputs):
        if out is None:
            continue
        if not isinstance(out, dict):
            raise ValueError(f"reducer 'merge' needs object outputs, but child {i} returned "
                             f"{type(out).__name__ if not isinstance(out, list) else 'an array'}; "
                             "use 'array' or a JavaScript reducer")
        merged.update(out)
    return merged


def _fail(plan: Plan, node: Node, message: str, kind: str) -> Step:
    """A node failed for good: it and every ancestor are `error`; every other unfinished node is cancelled."""
    error = {"message": message, "kind": kind, "node_id": node.id, "step": node.step.name}
    plan.put(node, state="error", error=error, completed_at=plan.now)
    plan.drop_work_for.add(node.id)
    root_id = node.root_id
    yield from _load_run(plan, root_id)
    ancestors: set[str] = set()
    cur = plan.nodes[node.id].parent_id
    while cur is not None:
        ancestors.add(cur)
        cur = plan.nodes[cur].parent_id
    for other in list(plan.nodes.values()):
        if other.root_id != root_id or other.terminal:
            continue
        if other.id in ancestors:
            plan.put(other, state="error", error=error, completed_at=plan.now)
        else:
            plan.put(other, state="cancelled", completed_at=plan.now)
        plan.drop_work_for.add(other.id)
