"""The parallel kind: every child at once on the parent's input, their outputs joined by a reducer."""

from __future__ import annotations

from collections.abc import Generator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from aetr.domain import flow
from aetr.domain.requests import Request, RunScript, ScriptResult, SetDone, Step

if TYPE_CHECKING:
    from aetr.domain.runs import Node, Plan

BUILTIN_REDUCERS = ("array", "last", "merge")


@dataclass(frozen=True)
class ParallelSpec:
    """A parallel step's one field: how its children's outputs become its output."""

    KIND: ClassVar[Literal["parallel"]] = "parallel"
    reducer: str = "array"  # array | last | merge | JavaScript (outputs, ctx) => value

    def to_json(self) -> dict[str, Any]:
        """The fields as stored and as the API shows them."""
        return {"reducer": self.reducer}

    @staticmethod
    def from_json(fields: Mapping[str, Any]) -> ParallelSpec:
        """The fields from their stored form."""
        return ParallelSpec(reducer=fields.get("reducer", "array"))


def start(plan: Plan, node: Node) -> Step:
    """Every child gets the parent's input (through its own mapper), all at once."""
    if node.n_children == 0:
        yield from reduce(plan, node, [], spec_of(node).reducer)
        return
    kids = yield from flow.children(plan, node)
    for kid in kids:
        if plan.nodes[node.id].state != "executing":
            break  # a sibling failed at once (its mapper threw): the run is over, start no more
        yield from flow.start_child(plan, node, kid, node.input)


def child_ended(plan: Plan, parent: Node, child: Node) -> Step:
    """Count the child; the last one to finish reduces every output."""
    if (yield from flow.count_finished(plan, parent)):
        yield from all_finished(plan, parent)


def all_finished(plan: Plan, parent: Node) -> Generator[Request, Any, bool]:
    """Every child was counted: reduce their outputs, in child order (False when one is not complete: a
    redrive reset the counter since, and it counts again)."""
    kids = yield from flow.children(plan, parent, fresh=True)
    if any(k.state != "complete" for k in kids):
        return False
    yield from reduce(plan, parent, [k.output for k in kids], spec_of(parent).reducer)
    return True


def resume(plan: Plan, node: Node, kids: list[Node]) -> Step:
    """A redrive: the unfinished children go on, the complete ones are counted as they are."""
    unfinished = [k for k in kids if k.state != "complete"]
    if not unfinished:
        yield from reduce(plan, node, [k.output for k in kids], spec_of(node).reducer)
        return
    plan.drop_work_for.add(node.id)  # counts still pending from before are in the new value
    yield from flow.set_counters(plan, node, SetDone(node.id, len(kids) - len(unfinished)))
    for kid in unfinished:
        if plan.nodes[node.id].state != "executing":
            break
        yield from flow.restart_child(plan, node, kid, node.input)


def spec_of(node: Node) -> ParallelSpec:
    """The parallel fields of a parallel node."""
    spec = node.step.spec
    assert isinstance(spec, ParallelSpec), f"node {node.id} is a {node.step.kind} step, not a parallel step"
    return spec


def reduce(plan: Plan, node: Node, outputs: list[Any], name: str) -> Step:
    """Complete `node` with the reducer `name` over `outputs`, or fail it with the reducer's error."""
    if name in BUILTIN_REDUCERS:
        try:
            output = builtin_reduce(name, outputs)
        except ValueError as exc:
            yield from flow.fail(plan, node, str(exc), "reducer")
            return
    else:
        result: ScriptResult = yield RunScript(name, [outputs, flow.ctx(plan, node, node.position)])
        if result.error is not None:
            yield from flow.fail(plan, node, result.error, "reducer")
            return
        output = result.value
    yield from flow.complete(plan, node, output)


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
