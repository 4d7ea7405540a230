"""The sequential kind: children one after another, each fed the previous one's output."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from aetr.domain import flow
from aetr.domain.requests import LoadChild, Step

if TYPE_CHECKING:
    from aetr.domain.runs import Node, Plan


@dataclass(frozen=True)
class SequentialSpec:
    """A sequential step has no fields of its own: its children are its links."""

    KIND: ClassVar[Literal["sequential"]] = "sequential"

    def to_json(self) -> dict[str, Any]:
        """No fields."""
        return {}

    @staticmethod
    def from_json(fields: Mapping[str, Any]) -> SequentialSpec:
        """No fields."""
        return SequentialSpec()


def start(plan: Plan, node: Node) -> Step:
    """Child 1 gets the parent's input (through its mapper); an empty sequence outputs its input."""
    if node.n_children == 0:
        yield from flow.complete(plan, node, node.input)
        return
    kids = yield from flow.children(plan, node)
    yield from flow.start_child(plan, node, kids[0], node.input)


def child_ended(plan: Plan, parent: Node, child: Node) -> Step:
    """The next child gets this one's output; the last one's output is the parent's.

    Children that finish as they start (empty parents, waits of no time) are advanced over in a loop, not by
    recursion: a sequence of thousands of them must not nest a call per child.
    """
    if parent.id in plan.advancing:  # the loop below runs for this parent: it takes the child on
        plan.advancing[parent.id] = child
        return
    plan.advancing[parent.id] = child
    try:
        while (ended := plan.advancing[parent.id]) is not None:
            plan.advancing[parent.id] = None
            yield from _advance(plan, plan.nodes[parent.id], ended)
    finally:
        del plan.advancing[parent.id]


def _advance(plan: Plan, parent: Node, child: Node) -> Step:
    if parent.state != "executing":
        return
    if child.position + 1 >= parent.n_children:
        yield from flow.complete(plan, parent, child.output)
        return
    # Only the next child: a long sequence must not re-read all its children at every step.
    if parent.id in plan.children:
        following = plan.nodes[plan.children[parent.id][child.position + 1]]
    else:
        following = yield LoadChild(parent.id, child.position + 1)
        plan.absorb([following])
        following = plan.nodes[following.id]
    yield from flow.start_child(plan, parent, following, child.output)


def resume(plan: Plan, node: Node, kids: list[Node]) -> Step:
    """A redrive: the first unfinished child goes on from its input, the ones after it start afresh."""
    unfinished = [k for k in kids if k.state != "complete"]
    if not unfinished:
        yield from flow.complete(plan, node, kids[-1].output if kids else node.input)
        return
    first = unfinished[0]
    for later in kids[first.position + 1:]:
        yield from flow.reset(plan, later)
    value = kids[first.position - 1].output if first.position > 0 else node.input
    yield from flow.restart_child(plan, node, first, value)
