"""What the decide code asks of its driver (the store, or a dict in tests), and what it answers an event with.

Each handler is a generator over a `Plan`: when it needs data it does not hold it yields one of these requests
and the driver sends back the answer, so the same code runs against the database and against a dict.
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass
from typing import Any, Literal


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
class BumpFailed:
    """Request: atomically add one to a map's count of failed items (answer: the new count)."""

    parent_id: str


@dataclass(frozen=True)
class NextItem:
    """Request: atomically take the next position a map may start (answer: that position, from 0)."""

    parent_id: str


@dataclass(frozen=True)
class TakeSlot:
    """Request: hold one of a step's `limit` slots for attempt `attempt` of node `node_id` (answer: True when one
    was free). `earlier` slots of the step were taken earlier in this same event, not yet written. The store
    makes takers and releasers of one step agree across processes."""

    step_id: str
    limit: int
    node_id: str
    attempt: int
    earlier: int = 0


@dataclass(frozen=True)
class Park:
    """Request: set a queued attempt aside until a slot of its step `step_id` (of `limit`) frees (its row keeps
    its due time)."""

    node_id: str
    attempt: int
    step_id: str
    limit: int


@dataclass(frozen=True)
class KeepItems:
    """Request: keep a map's items for the events that make the rest of them into nodes (None: forget them)."""

    node_id: str
    items: list[Any] | None


@dataclass(frozen=True)
class LoadItems:
    """Request: the items a map keeps (answer: list, or None when it keeps none)."""

    node_id: str


@dataclass(frozen=True)
class ReadNextItem:
    """Request: a map's next item position to start, without taking it; held until the commit, so that an
    event taking one waits for this one (answer: int)."""

    node_id: str


@dataclass(frozen=True)
class SetDone:
    """Request: set a parent's counters: finished children, failed items, next item to start (a redrive keeps
    the children that completed)."""

    parent_id: str
    value: int
    failed: int = 0
    next_item: int = 0


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


Request = (LoadChildren | LoadChild | LoadSubtree | BumpDone | BumpFailed | NextItem | SetDone | RunScript | TakeSlot
           | Park | KeepItems | LoadItems | ReadNextItem)
Step = Generator[Request, Any, None]


@dataclass(frozen=True)
class Verdict:
    """What a callback (or another outside report) was told."""

    outcome: Literal["accepted", "duplicate", "refused", "unknown"]
    reason: str = ""


ACCEPTED = Verdict("accepted")
