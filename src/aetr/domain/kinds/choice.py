"""The choice kind: the first child whose condition holds runs; the others are skipped."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from aetr.domain import flow
from aetr.domain.jsonvalue import json_type
from aetr.domain.requests import RunScript, ScriptResult, Step

if TYPE_CHECKING:
    from aetr.domain.runs import Node, Plan


@dataclass(frozen=True)
class ChoiceSpec:
    """A choice step's field: each child link's condition, by position (None: the default, always true)."""

    KIND: ClassVar[Literal["choice"]] = "choice"
    conditions: tuple[str | None, ...] = ()

    def to_json(self) -> dict[str, Any]:
        """Stored with the step; the API shows each condition as its link's `when` instead."""
        return {"conditions": list(self.conditions)}

    @staticmethod
    def from_json(fields: Mapping[str, Any]) -> ChoiceSpec:
        """The fields from their stored form."""
        return ChoiceSpec(conditions=tuple(fields.get("conditions") or ()))


def spec_of(node: Node) -> ChoiceSpec:
    """The choice fields of a choice node."""
    spec = node.step.spec
    assert isinstance(spec, ChoiceSpec), f"node {node.id} is a {node.step.kind} step, not a choice step"
    return spec


def check(conditions: list[str | None]) -> str:
    """What is wrong with a choice's conditions, or "": only the last link may go without `when`."""
    for i, when in enumerate(conditions[:-1]):
        if when is None:
            return (f"child {i} has no `when`, so it would always be chosen and the children after it never: "
                    "give it a condition, or make it the last child")
    return ""


def start(plan: Plan, node: Node) -> Step:
    """Try the conditions in order on the choice's input; run the first child whose condition is true."""
    kids = yield from flow.children(plan, node)
    conditions = spec_of(node).conditions
    chosen: Node | None = None
    for kid in kids:
        when = conditions[kid.position] if kid.position < len(conditions) else None
        if when is None:
            chosen = kid
            break
        result: ScriptResult = yield RunScript(when, [node.input, flow.ctx(plan, kid, kid.position)])
        where = f"the condition of child {kid.position} ('{kid.step.name}')"
        if result.error is not None:
            yield from flow.fail(plan, node, f"{where} failed: {result.error}", "mapper")
            return
        if result.value is True:
            chosen = kid
            break
        if result.value is not False:
            yield from flow.fail(plan, node, f"{where} returned {json_type(result.value)}, not true or false",
                                 "mapper")
            return
    for kid in kids:
        if kid is not chosen:
            yield from flow.skip(plan, kid)
    if chosen is None:
        yield from flow.complete(plan, node, node.input)
        return
    yield from flow.start_child(plan, node, chosen, node.input)


def child_ended(plan: Plan, parent: Node, child: Node) -> Step:
    """The chosen child's output is the choice's."""
    yield from flow.complete(plan, parent, child.output)


def resume(plan: Plan, node: Node, kids: list[Node]) -> Step:
    """A redrive: the chosen child goes on; a choice that failed before its child started chooses again."""
    running = [k for k in kids if k.state != "skipped"]
    if len(running) == 1 and running[0].started_at is not None:
        chosen = running[0]
        if chosen.state == "complete":
            yield from flow.complete(plan, node, chosen.output)
        else:
            yield from flow.restart_child(plan, node, chosen, node.input)
        return
    for kid in kids:
        yield from flow.reset(plan, kid)
    yield from start(plan, plan.nodes[node.id])
