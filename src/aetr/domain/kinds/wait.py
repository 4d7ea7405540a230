"""The wait kind: pause for some seconds, until a time, or until someone sends a signal."""

from __future__ import annotations

import math
from collections.abc import Generator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from aetr.domain import flow
from aetr.domain.jsonvalue import json_type
from aetr.domain.requests import ACCEPTED, Request, RunScript, ScriptResult, Step, Verdict
from aetr.domain.runs import Work

if TYPE_CHECKING:
    from aetr.domain.runs import Node, Plan

DEFAULT_SIGNAL_TIMEOUT_S = 3600.0


@dataclass(frozen=True)
class WaitSpec:
    """A wait step's fields: exactly one of `seconds`, `until` (JavaScript) or `signal`."""

    KIND: ClassVar[Literal["wait"]] = "wait"
    seconds: float | None = None
    until: str | None = None  # JavaScript (input, ctx) => ISO 8601 time or epoch seconds
    signal: bool = False
    timeout_s: float = DEFAULT_SIGNAL_TIMEOUT_S  # a signal wait fails as `timeout` after this long

    def to_json(self) -> dict[str, Any]:
        """The fields as stored and as the API shows them."""
        if self.signal:
            return {"signal": True, "timeout_s": self.timeout_s}
        if self.until is not None:
            return {"until": self.until}
        return {"seconds": self.seconds}

    @staticmethod
    def from_json(fields: Mapping[str, Any]) -> WaitSpec:
        """The fields from their stored form."""
        return WaitSpec(seconds=fields.get("seconds"), until=fields.get("until"),
                        signal=bool(fields.get("signal", False)),
                        timeout_s=float(fields.get("timeout_s", DEFAULT_SIGNAL_TIMEOUT_S)))


def spec_of(node: Node) -> WaitSpec:
    """The wait fields of a wait node."""
    spec = node.step.spec
    assert isinstance(spec, WaitSpec), f"node {node.id} is a {node.step.kind} step, not a wait step"
    return spec


def check(seconds: float | None, until: str | None, signal: bool | None) -> str:
    """What is wrong with a wait's fields, or "": exactly one of seconds, until and signal: true."""
    given = [name for name, value in (("seconds", seconds), ("until", until), ("signal", signal or None))
             if value is not None]
    if len(given) != 1:
        return ("a wait needs exactly one of `seconds`, `until` or `signal: true`, but "
                + (f"got {' and '.join(given)}" if given else "got none"))
    return ""


def parse_time(value: Any) -> datetime | None:
    """An `until` script's answer as a time: ISO 8601 text (UTC unless it says otherwise) or epoch seconds."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        if not math.isfinite(value) or abs(value) > 253_402_300_799:  # past 9999-12-31
            return None
        return datetime.fromtimestamp(value, UTC)
    if isinstance(value, str):
        try:
            at = datetime.fromisoformat(value.replace("Z", "+00:00") if value.endswith("Z") else value)
        except ValueError:
            return None
        return at.replace(tzinfo=UTC) if at.tzinfo is None else at.astimezone(UTC)
    return None


def start(plan: Plan, node: Node) -> Step:
    """Arm the wait's timer (or its signal's time-out); a time already past ends it at once."""
    spec = spec_of(node)
    node = plan.put(node, attempt=node.attempt + 1)
    if spec.signal:
        until = plan.now + timedelta(seconds=spec.timeout_s)
        node = plan.put(node, awaits_signal=True, wait_until=None)
        plan.drop_work_for.add(node.id)
        plan.work.append(Work("deadline", node.id, node.root_id, node.attempt, until))
        return
    if spec.until is not None:
        result: ScriptResult = yield RunScript(spec.until, [node.input, flow.ctx(plan, node, node.position)])
        if result.error is not None:
            yield from flow.fail(plan, node, f"the until script failed: {result.error}", "mapper")
            return
        end = parse_time(result.value)
        if end is None:
            yield from flow.fail(plan, node, f"the until script returned {json_type(result.value)} "
                                             f"({str(result.value)[:80]!r}), not an ISO 8601 time or epoch seconds",
                                 "mapper")
            return
    else:
        end = plan.now + timedelta(seconds=spec.seconds or 0.0)
    if end <= plan.now:
        yield from flow.complete(plan, node, node.input)
        return
    node = plan.put(node, wait_until=end, awaits_signal=False)
    plan.drop_work_for.add(node.id)
    plan.work.append(Work("timer", node.id, node.root_id, node.attempt, end))


def resume(plan: Plan, node: Node, kids: list[Node]) -> Step:
    """A redrive waits again, from now."""
    yield from start(plan, node)


def refusal(node: Node, attempt: int | None = None) -> str:
    """Why a timer or signal cannot end `node`, or "" when it can."""
    if node.step.kind != "wait":
        return f"node is a {node.step.kind} step, not a wait step"
    if node.state != "executing":
        return f"node is {node.state}, not waiting"
    if attempt is not None and node.attempt != attempt:
        return "the wait was started again since"
    return ""


def timer_fired(plan: Plan, node_id: str, attempt: int) -> Generator[Request, Any, Verdict]:
    """A timed wait's time came: it completes with its input."""
    node = plan.nodes[node_id]
    reason = refusal(node, attempt)
    if reason:
        return Verdict("refused", reason)
    plan.drop_work_for.add(node.id)
    yield from flow.complete(plan, node, node.input)
    return ACCEPTED


def signalled(plan: Plan, node_id: str, output: Any, error: str | None) -> Generator[Request, Any, Verdict]:
    """Someone answered a signal wait: with an output it completes, with an error it fails (kind `signal`)."""
    node = plan.nodes[node_id]
    reason = refusal(node)
    if not reason and not spec_of(node).signal:
        reason = "node is a timed wait, not a signal wait"
    if reason:
        return Verdict("refused", reason)
    plan.drop_work_for.add(node.id)
    if error is not None:
        yield from flow.fail(plan, node, error, "signal")
    else:
        yield from flow.complete(plan, node, output)
    return ACCEPTED


def deadline_passed(plan: Plan, node: Node, attempt: int) -> Generator[Request, Any, Verdict]:
    """Nobody answered a signal wait in time: it fails as a timeout."""
    reason = refusal(node, attempt)
    if reason:
        return Verdict("refused", reason)
    timeout_s = spec_of(node).timeout_s
    plan.event(node, "timeout", {"attempt": attempt, "timeout_s": timeout_s})
    yield from flow.fail(plan, node, f"no signal within timeout_s={timeout_s:g}", "timeout")
    return ACCEPTED
