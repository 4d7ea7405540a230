"""The map kind: one child subtree per item of a list, created when the map starts, joined by a reducer."""

from __future__ import annotations

import math
from collections.abc import Generator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from aetr.domain import flow
from aetr.domain.jsonvalue import json_type
from aetr.domain.kinds import parallel
from aetr.domain.requests import (
    ACCEPTED,
    LoadChild,
    LoadItems,
    Request,
    RunScript,
    ScriptResult,
    SetDone,
    Step,
    Verdict,
)
from aetr.domain.runs import Work

if TYPE_CHECKING:
    from aetr.domain.runs import Node, Plan
    from aetr.domain.steps import StepTree


@dataclass(frozen=True)
class MapSpec:
    """A map step's fields. `template` is its child link (mapper, subtree), frozen into run nodes only: a
    stored map step keeps its child as a link like any parent."""

    KIND: ClassVar[Literal["map"]] = "map"
    items: str | None = None  # JavaScript (input, ctx) => array; without it the input is the list
    max_concurrency: int | None = None  # item subtrees unfinished at once, at most
    tolerated_failures: int | str = 0  # a count, or a percentage of the items such as "10%"
    reducer: str = "array"
    template: tuple[str | None, StepTree] | None = None

    def to_json(self) -> dict[str, Any]:
        """The fields as stored and as the API shows them (the child link apart)."""
        out: dict[str, Any] = {"items": self.items, "max_concurrency": self.max_concurrency,
                               "tolerated_failures": self.tolerated_failures, "reducer": self.reducer}
        if self.template is not None:
            mapper, tree = self.template
            out["template"] = {"mapper": mapper, "step": tree.to_json()}
        return out

    @staticmethod
    def from_json(fields: Mapping[str, Any]) -> MapSpec:
        """The fields from their stored form (a run node's holds the child's subtree too)."""
        template = None
        if fields.get("template") is not None:
            from aetr.domain.steps import StepTree

            link = fields["template"]
            template = (link.get("mapper"), StepTree.from_json(link["step"]))
        return MapSpec(items=fields.get("items"), max_concurrency=fields.get("max_concurrency"),
                       tolerated_failures=fields.get("tolerated_failures", 0),
                       reducer=fields.get("reducer", "array"), template=template)

    def allowed_failures(self, n_items: int) -> int:
        """How many of `n_items` items may fail without failing the map."""
        tolerated = self.tolerated_failures
        if isinstance(tolerated, str):
            return math.floor(float(tolerated.rstrip("%")) * n_items / 100)
        return tolerated


def spec_of(node: Node) -> MapSpec:
    """The map fields of a map node."""
    spec = node.step.spec
    assert isinstance(spec, MapSpec), f"node {node.id} is a {node.step.kind} step, not a map step"
    return spec


def start(plan: Plan, node: Node) -> Step:
    """Compute the items, create one child subtree per item, and start as many as the limit allows."""
    spec = spec_of(node)
    assert spec.template is not None, "a run's map node carries its child's subtree"
    items: Any = node.input
    if spec.items is not None:
        result: ScriptResult = yield RunScript(spec.items, [node.input, flow.ctx(plan, node, node.position)])
        if result.error is not None:
            yield from flow.fail(plan, node, f"the items script failed: {result.error}", "mapper")
            return
        items = result.value
    if not isinstance(items, list):
        source = "its items script returned" if spec.items is not None else "its input is"
        yield from flow.fail(plan, node, f"a map needs an array of items, but {source} {json_type(items)}",
                             "mapper")
        return
    if not items:
        yield from parallel.reduce(plan, node, [], spec.reducer)
        return
    template = spec.template[1]
    size = len(items) * template.node_count
    if size > plan.max_nodes:
        yield from flow.fail(plan, node, f"{len(items)} items of {template.node_count} node(s) each would make "
                                         f"{size} run nodes, more than AETR_MAX_TREE_NODES={plan.max_nodes}: "
                                         "split the list, or raise the limit", "mapper")
        return
    n = len(items)
    node = plan.put(node, n_children=n)
    limit = min(spec.max_concurrency or n, n)
    yield from flow.set_counters(plan, node, SetDone(node.id, 0, 0, limit))
    # The items' subtrees are made a batch per event: a map of 100,000 items never holds the database for the
    # seconds that making them all at once takes. Later batches come from the items kept with the map.
    per_batch = max(1, plan.batch // template.node_count)
    yield from _make_and_start(plan, node, items[:per_batch], 0, limit)
    if n > per_batch and plan.nodes[node.id].state == "executing":
        yield from flow.keep_items(plan, node, items)
        plan.work.append(Work("grow", node.id, node.root_id, per_batch, plan.now))


def _make_and_start(plan: Plan, node: Node, batch: list[Any], first: int, limit: int) -> Step:
    """Make the subtrees of a batch of items (positions from `first` on) and start those below `limit`."""
    spec = spec_of(node)
    assert spec.template is not None
    mapper, template = spec.template
    for kid in flow.grow(plan, node, template, mapper, batch, first):
        if kid.position >= limit or plan.nodes[node.id].state != "executing":
            break  # waiting for a slot; or an item failed at once beyond what is tolerated: start no more
        yield from flow.start_child(plan, node, plan.nodes[kid.id], kid.input)


def grow(plan: Plan, node_id: str, first: int) -> Generator[Request, Any, Verdict]:
    """The next batch of a map's items becomes nodes (`first`: its first position); those whose turn has come
    start."""
    node = plan.nodes[node_id]
    if node.step.kind != "map":
        return Verdict("refused", f"node is a {node.step.kind} step, not a map")
    if node.state != "executing":
        yield from flow.keep_items(plan, node, None)
        return Verdict("refused", f"the map is {node.state}")
    items: list[Any] | None = yield LoadItems(node.id)
    if items is None or first >= len(items):
        return Verdict("refused", "the map has no items left to make")
    spec = spec_of(node)
    assert spec.template is not None
    per_batch = max(1, plan.batch // spec.template[1].node_count)
    # Items below the next position to start have had their turn: started here, as no event could start them
    # before they existed. Read under the counter's lock: an item finishing meanwhile waits for this event.
    limit = node.n_children if spec.max_concurrency is None else (yield from flow.next_item_now(plan, node))
    yield from _make_and_start(plan, node, items[first:first + per_batch], first, limit)
    if first + per_batch < len(items) and plan.nodes[node.id].state == "executing":
        plan.work.append(Work("grow", node.id, node.root_id, first + per_batch, plan.now))
    else:
        yield from flow.keep_items(plan, plan.nodes[node.id], None)
    return ACCEPTED


def child_ended(plan: Plan, parent: Node, child: Node) -> Step:
    """An item finished (or failed within what is tolerated): the next one takes its slot; the last to finish
    reduces every output."""
    if spec_of(parent).max_concurrency is not None:
        if parent.id in plan.freed_slots:  # start_next is looping for this map: it starts one more
            plan.freed_slots[parent.id] += 1
        else:
            yield from start_next(plan, parent)
    if plan.nodes[parent.id].state != "executing":
        return
    if (yield from flow.count_finished(plan, parent)):
        yield from all_finished(plan, parent)


def start_next(plan: Plan, parent: Node) -> Step:
    """Start the first item still waiting for a slot, in item order, if any; and one more for each item that
    finishes as it starts (a loop, not a recursion: a thousand such items must not nest a thousand calls)."""
    plan.freed_slots[parent.id] = 1
    try:
        while plan.freed_slots[parent.id] > 0 and plan.nodes[parent.id].state == "executing":
            plan.freed_slots[parent.id] -= 1
            yield from _start_one(plan, plan.nodes[parent.id])
    finally:
        del plan.freed_slots[parent.id]


def _start_one(plan: Plan, parent: Node) -> Step:
    while True:
        position: int = yield from flow.next_item(plan, parent)
        if position >= parent.n_children:
            return
        kid = _made_here(plan, parent, position)
        if kid is None:
            loaded: Node | None = yield LoadChild(parent.id, position)
            if loaded is None:
                return  # not made yet: the event that makes it starts it, its turn having come
            plan.absorb([loaded])
            kid = plan.nodes[loaded.id]
        if kid.state != "pending":
            continue  # complete before a redrive, or started by it
        if kid.started_at is None:
            yield from flow.start_child(plan, parent, kid, kid.input)
        else:  # a redrive left it waiting for a slot: it goes on from its recorded input
            yield from flow.resume(plan, kid)
        return


def _made_here(plan: Plan, parent: Node, position: int) -> Node | None:
    """The item at `position` when this event holds it: every item, or the batch this event made."""
    known = plan.children.get(parent.id)
    if known is not None and position < len(known) and plan.nodes[known[position]].position == position:
        return plan.nodes[known[position]]
    made = plan.new_children.get(parent.id)
    if made:
        offset = position - plan.nodes[made[0]].position
        if 0 <= offset < len(made):
            return plan.nodes[made[offset]]
    return None


def all_finished(plan: Plan, parent: Node) -> Generator[Request, Any, bool]:
    """Every item was counted: reduce their outputs in item order, a tolerated failure's as null (False when
    one is unfinished: a redrive reset the counter since, and it counts again)."""
    kids = yield from flow.children(plan, parent, fresh=True)
    if any(k.state not in ("complete", "error") for k in kids):
        return False
    outputs = [k.output if k.state == "complete" else None for k in kids]
    yield from parallel.reduce(plan, parent, outputs, spec_of(parent).reducer)
    return True


def tolerates(plan: Plan, parent: Node) -> Generator[Request, Any, bool]:
    """Whether the map takes one more failed item without failing (the failure is counted either way)."""
    allowed = spec_of(parent).allowed_failures(parent.n_children)
    if allowed == 0:
        return False
    failed: int = yield from flow.bump_failed(plan, parent)
    return failed <= allowed


def resume(plan: Plan, node: Node, kids: list[Node]) -> Step:
    """A redrive: only the items that did not complete run again, as many at once as the limit allows."""
    if not kids:  # the items were never made (the items script failed): start afresh
        yield from start(plan, node)
        return
    spec = spec_of(node)
    unfinished = [k for k in kids if k.state != "complete"]
    missing = node.n_children - len(kids)  # items not made yet when the map stopped: made now, batch by batch
    if not unfinished and not missing:
        yield from parallel.reduce(plan, node, [k.output for k in kids], spec.reducer)
        return
    limit = spec.max_concurrency or node.n_children
    now, later = unfinished[:limit], unfinished[limit:]
    if spec.max_concurrency is None:
        next_item = node.n_children
    elif len(now) < limit:  # slots left for items not made yet
        next_item = len(kids) + min(limit - len(now), missing)
    else:
        next_item = now[-1].position + 1
    plan.drop_work_for.add(node.id)  # counts still pending from before are in the new value
    yield from flow.set_counters(plan, node, SetDone(node.id, len(kids) - len(unfinished), 0, next_item))
    if missing:
        plan.work.append(Work("grow", node.id, node.root_id, len(kids), plan.now))
    for kid in later:  # waiting for a slot again, their records kept for when it comes
        plan.put(kid, state="pending", error=None, completed_at=None)
    for kid in now:
        if plan.nodes[node.id].state != "executing":
            break
        yield from flow.restart_child(plan, node, kid, kid.input)
