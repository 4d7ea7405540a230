"""The store's own requests: what an event's program yields besides the decide handlers' (LoadChild, BumpDone…).

An event (a callback, a deadline, a new run) is a *program*: a generator that yields requests and receives
their answers. aetr.store.lowering turns each request into operations on prebuilt statements, so the SQLite
backend can run a whole event in its writer and the PostgreSQL backend on one asyncpg connection, with the
same code deciding what to send.
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from aetr.domain.runs import EventRecord, Node, Plan, Work


@dataclass(frozen=True)
class LoadTree:
    """Request: the resolved step tree of the step named (or with id) `key` (answer: StepTree or None)."""

    key: str


@dataclass(frozen=True)
class LoadChain:
    """Request: a node and all its ancestors, and its next sibling (answer: Chain). `ends_attempt`: the event
    reports the end of the node's attempt (at `now`), which frees its slot if it holds one: PostgreSQL then
    claims the step's longest-waiting attempt along with the chain, for NextWaiting to find."""

    node_id: str
    ends_attempt: bool = False
    now: datetime | None = None


@dataclass(frozen=True)
class Chain:
    """A node and its ancestors (empty when there is no such node), and the node's next sibling if any."""

    nodes: list[Node]
    following: Node | None


@dataclass(frozen=True)
class Lease:
    """Work rows this process will perform right after the commit, leased to it until `until`.

    `keys` are (kind, node id, attempt) of the rows.
    """

    owner: str
    until: datetime
    keys: frozenset[tuple[str, str, int]]


@dataclass(frozen=True)
class Apply:
    """Request: write a plan — changed nodes under their read versions (Conflict otherwise), work, history."""

    plan: Plan
    lease: Lease | None = None
    new_run: InsertRun | None = None  # insert these nodes in their final state (the plan's nodes are not updated)
    finished: Sequence[FinishCall] = ()  # work rows performed meanwhile, deleted with the rest (records not written)


@dataclass(frozen=True)
class InsertRun:
    """What a new run's root row carries besides its node (see Apply): the snapshot and the idempotency key."""

    snapshot: str  # the step tree's JSON text (StepTree.snapshot_text)
    idempotency_key: str | None


@dataclass(frozen=True)
class FindRunByKey:
    """Request: the run started with an idempotency key (answer: its id or None)."""

    key: str


@dataclass(frozen=True)
class FinishCall:
    """A work row was performed and needs nothing more: forget it, and record the answer when there is one."""

    node_id: str
    attempt: int
    kind: str = "dispatch"
    record: EventRecord | None = None
    # A call made late (after a restart, say): its attempt's deadlines move to count from the call.
    deadline_at: datetime | None = None
    heartbeat_at: datetime | None = None


@dataclass(frozen=True)
class FinishCalls:
    """Request: several FinishCall at once."""

    calls: Sequence[FinishCall]


@dataclass(frozen=True)
class RenewLease:
    """Request: keep holding a dispatch row while its call still runs."""

    node_id: str
    attempt: int
    owner: str
    until: datetime


@dataclass(frozen=True)
class PendingCall:
    """Request: whether an attempt's call is still to be answered — its dispatch row is there — and when it will
    be made at the latest: when it is due, or when the lease of a process that may be making it ends (answer:
    that time, or None when the row is gone)."""

    node_id: str
    attempt: int


@dataclass(frozen=True)
class NextWaiting:
    """Request: up to `count` attempts of the step `step_id` queued for a slot and due by `now`, the one that
    became due first first, leaving out the nodes `besides` (answer: their nodes). On PostgreSQL they are
    claimed for this event, so that events freeing slots at once hand them to different attempts."""

    step_id: str
    count: int
    now: datetime
    besides: tuple[str, ...] = ()


@dataclass(frozen=True)
class WorkDue:
    """Request: when a work row is due now (answer: that time, or None when the row is gone)."""

    node_id: str
    attempt: int
    kind: str


@dataclass(frozen=True)
class Postpone:
    """Request: move a work row to a later due time, and let go of its lease."""

    kind: str
    node_id: str
    attempt: int
    due_at: datetime


@dataclass(frozen=True)
class CountChild:
    """Request: count a parent's finished child once, deleting its `count` work row in the same statement.

    The count that reaches the parent's number of children also inserts a `complete` work row for the parent,
    leased to `owner` until `until`: completing the parent is then as durable as the count. Answer: True
    when this count was the last one.
    """

    parent_id: str
    position: int
    now: datetime
    owner: str
    until: datetime


@dataclass(frozen=True)
class LoadRoot:
    """Request: a run's root node as committed (answer: Node, or None when there is no such run)."""

    root_id: str


@dataclass(frozen=True)
class NotifyTried:
    """Request: record one try of a notification (`record`, in the run's history) and, when `next_at` is set,
    keep its work row for another try then (its tries counted one more, its lease let go); else forget the row.

    Only the process still holding the row's lease (`owner`) records anything: answer False when another
    process took the row over meanwhile (this try then leaves no trace; the other process tries again).
    """

    notification_id: str
    attempt: int
    owner: str
    record: EventRecord
    next_at: datetime | None


@dataclass(frozen=True)
class ClaimedWork:
    """A work row this process holds the lease on, with its node when it is a call."""

    work: Work
    node: Node | None = None


@dataclass(frozen=True)
class Claim:
    """Request: lease up to `limit` due work rows nobody holds (answer: ClaimResult)."""

    owner: str
    now: datetime
    limit: int
    lease_s: float


@dataclass(frozen=True)
class ClaimResult:
    """The claimed work, and when the next row becomes claimable (None when there is none)."""

    claimed: list[ClaimedWork]
    next_due: datetime | None = None


Program = Generator[Any, Any, Any]  # yields the decide handlers' and this module's requests; returns the event's result


def single(request: Any) -> Program:
    """A program of one request."""
    return (yield request)
