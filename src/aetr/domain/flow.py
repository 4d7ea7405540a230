"""How a run moves, whatever its kinds: start a node, feed a child through its link's mapper, complete, fail,
skip, reset, resume, count children, and grow a run by new subtrees.

Every rule that differs by kind is asked of the kind's module (aetr.domain.kinds), matched exhaustively on
the node's `Spec`. The kind modules call back into this one for the moves they share.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any, assert_never

from aetr.domain import kinds
from aetr.domain.kinds import api, choice, map, parallel, sequential, wait
from aetr.domain.requests import (
    BumpDone,
    BumpFailed,
    KeepItems,
    LoadChildren,
    LoadSubtree,
    NextItem,
    ReadNextItem,
    Request,
    RunScript,
    ScriptResult,
    SetDone,
    Step,
)
from aetr.domain.runs import Counters, Node, Plan

if TYPE_CHECKING:
    from aetr.domain.steps import StepTree


# ---- reading --------------------------------------------------------------------------------------------


def children(plan: Plan, parent: Node, fresh: bool = False) -> Generator[Request, Any, list[Node]]:
    """A parent's children in order, read once per event (`fresh`: read again, as siblings may have finished
    in other transactions; a parent this event created has no other transactions, and nothing to read)."""
    if fresh and parent.id not in plan.counters:
        plan.children.pop(parent.id, None)
    if parent.id not in plan.children:
        plan.absorb((yield LoadChildren(parent.id)), children_of=[parent.id])
    return [plan.nodes[i] for i in plan.children[parent.id]]


def subtree(plan: Plan, node: Node) -> Generator[Request, Any, list[Node]]:
    """`node` and every node below it (read once, unless the plan holds every child list already)."""
    if not _knows_subtree(plan, node.id):
        rows: list[Node] = yield LoadSubtree(node.id)
        plan.absorb(rows, children_of=[r.id for r in rows])
    out, stack = [], [node.id]
    while stack:
        current = plan.nodes[stack.pop()]
        out.append(current)
        stack.extend(plan.children.get(current.id, ()))
    return out


def _knows_subtree(plan: Plan, node_id: str) -> bool:
    if plan.whole_run:
        return True
    stack = [node_id]
    while stack:
        current = plan.nodes.get(stack.pop())
        if current is None or (current.id not in plan.children and (current.n_children or current.step.kind
                                                                      in kinds.COUNTING)):
            return False
        stack.extend(plan.children.get(current.id, ()))
    return True


def load_run(plan: Plan, root_id: str) -> Step:
    """Bring the whole run into the plan (for the rare events that touch every node)."""
    if plan.whole_run:
        return
    rows: list[Node] = yield LoadSubtree(root_id)
    plan.absorb(rows, children_of=[r.id for r in rows])
    plan.whole_run = True


def ctx(plan: Plan, node: Node, index: int) -> dict[str, Any]:
    """The `ctx` argument of a node's scripts."""
    root = plan.nodes[node.root_id]
    return {"run": {"id": root.id, "input": root.input}, "step": {"name": node.step.name}, "index": index}


# ---- moving -----------------------------------------------------------------------------------------------


def start(plan: Plan, node: Node, value: Any) -> Step:
    """Start a node with its input, as its kind starts."""
    spec = node.step.spec
    # A step with max_concurrency waits `pending` (its input recorded) until it holds one of its slots.
    waits = isinstance(spec, kinds.ApiSpec) and api.waits_for_slots(node)
    node = plan.put(node, state="pending" if waits else "executing", input=value, started_at=plan.now,
                    output=None, error=None)
    match spec:
        case kinds.ApiSpec():
            yield from api.start(plan, node)
        case kinds.SequentialSpec():
            yield from sequential.start(plan, node)
        case kinds.ParallelSpec():
            yield from parallel.start(plan, node)
        case kinds.MapSpec():
            yield from map.start(plan, node)
        case kinds.ChoiceSpec():
            yield from choice.start(plan, node)
        case kinds.WaitSpec():
            yield from wait.start(plan, node)
        case _:
            assert_never(spec)


def start_child(plan: Plan, parent: Node, kid: Node, value: Any) -> Step:
    """Map the parent's value through the link's mapper, then start the child with it."""
    if kid.mapper is not None:
        result: ScriptResult = yield RunScript(kid.mapper, [value, ctx(plan, kid, kid.position)])
        if result.error is not None:
            # The child never started: it keeps the value it was to be mapped from (a map item, its item).
            yield from fail(plan, kid, result.error, "mapper")
            return
        value = result.value
    yield from start(plan, kid, value)


def complete(plan: Plan, node: Node, output: Any) -> Step:
    """A node completes with `output`; its parent hears of it."""
    node = plan.put(node, state="complete", output=output, completed_at=plan.now)
    yield from _child_ended(plan, node)


def _child_ended(plan: Plan, child: Node) -> Step:
    """A child completed (or failed within what its map tolerates): its parent moves on, as its kind does."""
    if child.parent_id is None:
        return
    parent = plan.nodes[child.parent_id]
    if parent.state != "executing":
        return
    spec = parent.step.spec
    match spec:
        case kinds.SequentialSpec():
            yield from sequential.child_ended(plan, parent, child)
        case kinds.ParallelSpec():
            yield from parallel.child_ended(plan, parent, child)
        case kinds.MapSpec():
            yield from map.child_ended(plan, parent, child)
        case kinds.ChoiceSpec():
            yield from choice.child_ended(plan, parent, child)
        case kinds.ApiSpec() | kinds.WaitSpec():
            raise AssertionError(f"a {spec.KIND} step has no children")
        case _:
            assert_never(spec)


def all_counted(plan: Plan, parent: Node) -> Generator[Request, Any, bool]:
    """Every child of a counting parent was counted (after their commits): complete it. False when one is not
    finished after all (a redrive reset the counter since, and it counts again)."""
    spec = parent.step.spec
    match spec:
        case kinds.ParallelSpec():
            return (yield from parallel.all_finished(plan, parent))
        case kinds.MapSpec():
            return (yield from map.all_finished(plan, parent))
        case kinds.ApiSpec() | kinds.SequentialSpec() | kinds.ChoiceSpec() | kinds.WaitSpec():
            raise AssertionError(f"a {spec.KIND} step does not count its children")
        case _:
            assert_never(spec)


def fail(plan: Plan, node: Node, message: str, kind: str) -> Step:
    """A node failed for good. The error climbs to every ancestor, up to a map that tolerates one more failed
    item; every unfinished node below the highest one it reached is cancelled (the whole run when it reached
    the root)."""
    error = {"message": message, "kind": kind, "node_id": node.id, "step": node.step.name}
    top = plan.put(node, state="error", error=error, completed_at=plan.now)
    ended = {node.id}
    tolerating: Node | None = None
    while top.parent_id is not None:
        parent = plan.nodes[top.parent_id]
        if isinstance(parent.step.spec, kinds.MapSpec) and parent.state == "executing" and (
                yield from map.tolerates(plan, parent)):
            tolerating = parent
            break
        top = plan.put(parent, state="error", error=error, completed_at=plan.now)
        ended.add(top.id)
    if top.parent_id is None:
        yield from load_run(plan, top.root_id)
        scope = [n for n in plan.nodes.values() if n.root_id == top.root_id]
    else:
        scope = yield from subtree(plan, top)
    for other in scope:
        if not plan.nodes[other.id].terminal:
            plan.put(plan.nodes[other.id], state="cancelled", completed_at=plan.now)
            ended.add(other.id)
    plan.drop_work(ended)
    if tolerating is not None:
        plan.event(top, "item.failed", {"map": tolerating.step.name, "position": top.position})
        yield from map.child_ended(plan, plan.nodes[tolerating.id], plan.nodes[top.id])


def skip(plan: Plan, node: Node) -> Step:
    """A node and its subtree will not run (a choice chose another child): all become `skipped`."""
    for current in (yield from subtree(plan, node)):
        plan.put(plan.nodes[current.id], state="skipped", completed_at=plan.now)


def reset(plan: Plan, node: Node, keep_input: bool = False) -> Step:
    """Make a node and its descendants pending again, as if they had never run (`keep_input`: a map item keeps
    its item)."""
    for current in (yield from subtree(plan, node)):
        current = plan.nodes[current.id]
        if current.state != "pending":
            plan.put(current, state="pending", input=current.input if keep_input and current.id == node.id else None,
                     output=None, error=None, started_at=None, completed_at=None, attempt_base=current.attempt,
                     wait_until=None, awaits_signal=False)
            if current.step.kind in kinds.COUNTING:
                plan.drop_work_for.add(current.id)
                yield from set_counters(plan, current, SetDone(current.id, 0))


def restart_child(plan: Plan, parent: Node, kid: Node, value: Any) -> Step:
    """Resume a child that started; start afresh (its mapper included) one that never did."""
    if kid.started_at is not None:
        yield from resume(plan, kid)
        return
    in_map = isinstance(parent.step.spec, kinds.MapSpec)
    yield from reset(plan, kid, keep_input=in_map)
    yield from start_child(plan, parent, plan.nodes[kid.id], plan.nodes[kid.id].input if in_map else value)


def resume(plan: Plan, node: Node) -> Step:
    """Run a failed or cancelled node again from its recorded input, keeping the children that completed."""
    node = plan.put(node, state="executing", output=None, error=None, completed_at=None)
    spec = node.step.spec
    if isinstance(spec, kinds.ApiSpec):
        yield from api.resume(plan, node)
        return
    kids = (yield from children(plan, node)) if kinds.has_children(spec) else []
    match spec:
        case kinds.SequentialSpec():
            yield from sequential.resume(plan, node, kids)
        case kinds.ParallelSpec():
            yield from parallel.resume(plan, node, kids)
        case kinds.MapSpec():
            yield from map.resume(plan, node, kids)
        case kinds.ChoiceSpec():
            yield from choice.resume(plan, node, kids)
        case kinds.WaitSpec():
            yield from wait.resume(plan, node, kids)
        case _:
            assert_never(spec)


# ---- counting a parent's children ---------------------------------------------------------------------------


def count_finished(plan: Plan, parent: Node) -> Generator[Request, Any, bool]:
    """Count a finished child of a counting parent; True when it was the last one and the event goes on to
    complete the parent. A parent this event created counts in the plan; on PostgreSQL a stored parent's
    children are counted by the event's write (Plan.count_later), so this says False, and the write that
    counts the last one has the parent completed."""
    counters = plan.counters.get(parent.id)
    if counters is not None:
        counters.done += 1
        return counters.done >= parent.n_children
    if plan.count_later:
        plan.counted.append((parent.id, parent.root_id))
        return False
    done: int = yield BumpDone(parent.id)
    return done >= parent.n_children


def set_counters(plan: Plan, node: Node, values: SetDone) -> Step:
    """Set a counting parent's counters (in the plan, when this event created it)."""
    counters = plan.counters.get(node.id)
    if counters is not None:
        counters.done, counters.failed, counters.next_item = values.value, values.failed, values.next_item
        return
    yield values


def bump_failed(plan: Plan, node: Node) -> Generator[Request, Any, int]:
    """Add one to a map's failed items; the new count."""
    counters = plan.counters.get(node.id)
    if counters is not None:
        counters.failed += 1
        return counters.failed
    failed: int = yield BumpFailed(node.id)
    return failed


def keep_items(plan: Plan, node: Node, items: list[Any] | None) -> Step:
    """Keep a map's items for the events that make the rest of them into nodes (None: forget them)."""
    counters = plan.counters.get(node.id)
    if counters is not None:
        counters.items = items
        return
    yield KeepItems(node.id, items)


def next_item_now(plan: Plan, node: Node) -> Generator[Request, Any, int]:
    """The next item position a map may start, read without taking it (and held until the commit)."""
    counters = plan.counters.get(node.id)
    if counters is not None:
        return counters.next_item
    position: int = yield ReadNextItem(node.id)
    return position


def next_item(plan: Plan, node: Node) -> Generator[Request, Any, int]:
    """Take the next item position a map may start."""
    counters = plan.counters.get(node.id)
    if counters is not None:
        counters.next_item += 1
        return counters.next_item - 1
    taken: int = yield NextItem(node.id)
    return taken


# ---- growing -----------------------------------------------------------------------------------------------


def build_nodes(tree: StepTree, root_id: str, parent_id: str | None, position: int, mapper: str | None,
                run_input: Any, now: datetime, new_id: Callable[[], str], node_id: str | None = None) -> list[Node]:
    """The pending nodes of `tree` placed at (`parent_id`, `position`), parents before children. A map's items
    are not among them: they are made when the map starts."""
    nodes: list[Node] = []
    stack: list[tuple[StepTree, str, str | None, int, str | None]] = [
        (tree, node_id or new_id(), parent_id, position, mapper)]
    while stack:
        sub, nid, pid, pos, link_mapper = stack.pop()
        config = sub.run_config
        grows = isinstance(config.spec, kinds.MapSpec)
        nodes.append(Node(id=nid, root_id=root_id or nid, parent_id=pid, position=pos, step=config,
                          mapper=link_mapper, n_children=0 if grows else len(sub.children), created_at=now,
                          input=run_input if pid == parent_id else None))
        if grows:
            continue
        for p in range(len(sub.children) - 1, -1, -1):
            child_mapper, child = sub.children[p]
            stack.append((child, new_id(), nid, p, child_mapper))
    return nodes


def build_run_nodes(tree: StepTree, run_input: Any, now: datetime, new_id: Callable[[], str]) -> list[Node]:
    """Every node of a new run of `tree`, all pending, parents before children (the root first)."""
    root_id = new_id()
    return build_nodes(tree, root_id, None, 0, None, run_input, now, new_id, node_id=root_id)


def insert(plan: Plan, nodes: Sequence[Node]) -> None:
    """Add nodes this event creates to the plan: they are written, in their final state, at its commit."""
    plan.absorb(nodes, children_of=[n.id for n in nodes])
    for n in nodes:
        plan.inserted[n.id] = None
        if n.step.kind in kinds.COUNTING:
            plan.counters[n.id] = Counters()


def grow(plan: Plan, parent: Node, template: StepTree, mapper: str | None, items: list[Any],
         first: int = 0) -> list[Node]:
    """Give `parent` one new child subtree of `template` per item, at positions from `first` on, each child
    pending with its item as input."""
    new_id = plan.new_id
    assert new_id is not None, "this event cannot create nodes"
    nodes: list[Node] = []
    kids: list[Node] = []
    for position, item in enumerate(items, start=first):
        subtree_nodes = build_nodes(template, parent.root_id, parent.id, position, mapper, item, plan.now, new_id)
        kids.append(subtree_nodes[0])
        nodes.extend(subtree_nodes)
    insert(plan, nodes)
    plan.new_children.setdefault(parent.id, []).extend(k.id for k in kids)
    if first == 0:
        plan.children[parent.id] = [k.id for k in kids]
    elif parent.id in plan.children:
        plan.children[parent.id].extend(k.id for k in kids)
    return [plan.nodes[k.id] for k in kids]
