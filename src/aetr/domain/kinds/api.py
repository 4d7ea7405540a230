"""The api kind: a leaf that calls an HTTP service with its input and waits for its answer or callback."""

from __future__ import annotations

from collections.abc import Generator, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from aetr.domain import flow
from aetr.domain.requests import ACCEPTED, Park, Request, Step, TakeSlot, Verdict
from aetr.domain.runs import Work

if TYPE_CHECKING:
    from aetr.domain.runs import Node, Plan

DEFAULT_TIMEOUT_S = 3600.0
MAX_RETRY_AFTER_S = 3600.0  # a step's Retry-After is honoured up to an hour


@dataclass(frozen=True)
class RetryPolicy:
    """How often, and how far apart, a failed attempt of an api step is tried again."""

    max_attempts: int = 3
    backoff_s: float = 1.0
    max_backoff_s: float = 60.0

    def to_json(self) -> dict[str, Any]:
        """The policy as the API shows it."""
        return {"max_attempts": self.max_attempts, "backoff_s": self.backoff_s,
                "max_backoff_s": self.max_backoff_s}


@dataclass(frozen=True)
class ApiSpec:
    """An api step's fields: where and how to call it, how long to wait, how to retry, how many at once."""

    KIND: ClassVar[Literal["api"]] = "api"
    url: str
    method: str = "POST"
    headers: Mapping[str, str] = field(default_factory=dict)
    mode: Literal["callback", "sync"] = "callback"
    timeout_s: float = DEFAULT_TIMEOUT_S
    heartbeat_s: float | None = None
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    max_concurrency: int | None = None  # attempts in flight at most, across runs and processes

    def to_json(self) -> dict[str, Any]:
        """The fields as stored and as the API shows them."""
        out = {"url": self.url, "method": self.method, "headers": dict(self.headers), "mode": self.mode,
               "timeout_s": self.timeout_s, "heartbeat_s": self.heartbeat_s, "retry": self.retry.to_json()}
        if self.max_concurrency is not None:
            out["max_concurrency"] = self.max_concurrency
        return out

    @staticmethod
    def from_json(fields: Mapping[str, Any]) -> ApiSpec:
        """The fields from their stored form (validated when written)."""
        retry = fields.get("retry") or {}
        return ApiSpec(url=fields["url"], method=fields.get("method", "POST"),
                       headers=dict(fields.get("headers") or {}), mode=fields.get("mode", "callback"),
                       timeout_s=float(fields.get("timeout_s", DEFAULT_TIMEOUT_S)),
                       heartbeat_s=fields.get("heartbeat_s"),
                       retry=RetryPolicy(**retry) if retry else RetryPolicy(),
                       max_concurrency=fields.get("max_concurrency"))


def spec_of(node: Node) -> ApiSpec:
    """The api fields of an api node."""
    spec = node.step.spec
    assert isinstance(spec, ApiSpec), f"node {node.id} is a {node.step.kind} step, not an api step"
    return spec


# ---- how it runs --------------------------------------------------------------------------------------


NO_SLOT = "every slot of the step is taken"


def waits_for_slots(node: Node) -> bool:
    """Whether the node's attempts take one of its step's slots (max_concurrency) before their call."""
    return spec_of(node).max_concurrency is not None


def start(plan: Plan, node: Node) -> Step:
    """Queue the first attempt's call. A limited step's attempt takes a slot at once when one is free, else it
    is set aside until an attempt holding one ends and hands it on."""
    node = plan.put(node, attempt=node.attempt + 1)
    limit = spec_of(node).max_concurrency
    if limit is not None:
        step_id = node.step.id
        taken = plan.slots_taken.get(step_id, 0)
        if taken < limit and (yield TakeSlot(step_id, limit, node.id, node.attempt, taken)):
            plan.slots_taken[step_id] = taken + 1
            node = plan.put(node, state="executing", holds_slot=True)
        else:
            plan.parked.add(("queued", node.id, node.attempt))
    arm(plan, node, 0.0)


def resume(plan: Plan, node: Node) -> Step:
    """A redrive: a new attempt, with a fresh retry budget."""
    node = plan.put(node, attempt_base=node.attempt, attempt=node.attempt + 1)
    arm(plan, node, 0.0)
    return
    yield


def hand_slot(plan: Plan, node: Node) -> None:
    """A slot freed by this event goes to `node`, whose attempt has waited longest for one: its call is queued."""
    queued = ("queued", node.id, node.attempt)
    if queued in plan.parked:  # set aside by this very event: its queued row is not written at all
        plan.parked.discard(queued)
        plan.work[:] = [w for w in plan.work if (w.kind, w.node_id, w.attempt) != queued]
    node = plan.put(node, state="executing", holds_slot=True)
    plan.handed.add(node.id)
    arm(plan, node, 0.0)


def slot_offered(plan: Plan, node_id: str, attempt: int) -> Generator[Request, Any, Verdict]:
    """A queued attempt of a limited step came due: it takes a slot and is called, or waits, set aside, until
    an attempt holding one ends."""
    node = plan.nodes[node_id]
    if node.state not in ("pending", "executing") or node.attempt != attempt or node.holds_slot:
        plan.forget.append(("queued", node_id, attempt))
        return Verdict("refused", "the attempt no longer waits for a slot")
    limit = spec_of(node).max_concurrency or 1
    if not (yield TakeSlot(node.step.id, limit, node_id, attempt)):
        yield Park(node_id, attempt, node.step.id, limit)
        return Verdict("refused", NO_SLOT)
    node = plan.put(node, state="executing", holds_slot=True)
    arm(plan, node, 0.0)
    return ACCEPTED


def arm(plan: Plan, node: Node, delay_s: float) -> None:
    """Queue the call of the node's current attempt, its deadline, and its first heartbeat deadline."""
    spec = spec_of(node)
    at = plan.now + timedelta(seconds=delay_s)
    plan.drop_work_for.add(node.id)
    if spec.max_concurrency is not None and not node.holds_slot:
        # Queued until a slot is free; its deadline counts from the call, armed when it takes one.
        plan.work.append(Work("queued", node.id, node.root_id, node.attempt, at))
        return
    plan.work.append(Work("dispatch", node.id, node.root_id, node.attempt, at))
    plan.work.append(Work("deadline", node.id, node.root_id, node.attempt, at + timedelta(seconds=spec.timeout_s)))
    if spec.heartbeat_s is not None:
        plan.work.append(Work("heartbeat", node.id, node.root_id, node.attempt,
                              at + timedelta(seconds=spec.heartbeat_s)))


def refusal(node: Node, attempt: int) -> str:
    """Why a report about `attempt` of `node` cannot be taken, or "" when it can."""
    if node.step.kind != "api":
        return f"node is a {node.step.kind} step, not an api step"
    if node.state != "executing":
        return f"node is already {node.state}"
    if node.attempt != attempt:
        return f"attempt {attempt} was superseded by attempt {node.attempt}"
    return ""


# ---- the events that only api steps have -----------------------------------------------------------------


def step_succeeded(plan: Plan, node_id: str, attempt: int, output: Any) -> Generator[Request, Any, Verdict]:
    """The step reported success (its callback, or a sync answer); the plan holds the node's ancestors."""
    node = plan.nodes[node_id]
    if node.state == "complete" and node.attempt == attempt and node.output == output:
        return Verdict("duplicate", "this result was already accepted")
    reason = refusal(node, attempt)
    if reason:
        return Verdict("refused", reason)
    plan.drop_work_for.add(node.id)
    yield from flow.complete(plan, node, output)
    return ACCEPTED


def attempt_failed(plan: Plan, node_id: str, attempt: int, message: str, kind: str, retryable: bool,
                   retry_after_s: float | None = None) -> Generator[Request, Any, Verdict]:
    """An attempt failed; it is tried again while the retry policy allows, else the node fails.

    The wait before the next attempt is full-jitter exponential backoff, capped, and never shorter than a
    `Retry-After` the step asked for.
    """
    node = plan.nodes[node_id]
    if node.state == "error" and node.attempt == attempt and (node.error or {}).get("message") == message:
        return Verdict("duplicate", "this failure was already accepted")
    reason = refusal(node, attempt)
    if reason:
        return Verdict("refused", reason)
    policy = spec_of(node).retry
    if retryable and node.attempt - node.attempt_base < policy.max_attempts:
        delay = plan.jitter * min(policy.max_backoff_s, policy.backoff_s * 2 ** (node.attempt - 1))
        if retry_after_s is not None:
            delay = max(delay, min(retry_after_s, MAX_RETRY_AFTER_S))
        plan.event(node, "retry", {"attempt": node.attempt, "error": message, "kind": kind,
                                   "next_attempt": node.attempt + 1, "delay_s": delay})
        node = plan.put(node, attempt=node.attempt + 1)
        arm(plan, node, delay)
        return ACCEPTED
    yield from flow.fail(plan, node, message, kind)
    return ACCEPTED


def deadline_passed(plan: Plan, node: Node, attempt: int, heartbeat: bool) -> Generator[Request, Any, Verdict]:
    """An attempt's deadline (or its heartbeat deadline) passed without an answer: it fails as a timeout."""
    spec = spec_of(node)
    if heartbeat:
        limit = f"no heartbeat within heartbeat_s={spec.heartbeat_s:g}"
        plan.event(node, "timeout", {"attempt": attempt, "heartbeat_s": spec.heartbeat_s})
    else:
        limit = f"no answer within timeout_s={spec.timeout_s:g}"
        plan.event(node, "timeout", {"attempt": attempt, "timeout_s": spec.timeout_s})
    return (yield from attempt_failed(plan, node.id, attempt, limit, "timeout", True))


def heartbeat(plan: Plan, node_id: str, attempt: int) -> Generator[Request, Any, Verdict]:
    """The step says it is alive: its heartbeat deadline starts again."""
    node = plan.nodes[node_id]
    reason = refusal(node, attempt)
    if reason:
        return Verdict("refused", reason)
    spec = spec_of(node)
    if spec.heartbeat_s is not None:
        plan.drop_heartbeats_for.add(node.id)
        plan.work.append(Work("heartbeat", node.id, node.root_id, node.attempt,
                              plan.now + timedelta(seconds=spec.heartbeat_s)))
    return ACCEPTED
    yield  # a generator like every handler, though it needs nothing read
