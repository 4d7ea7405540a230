"""Run trees: nodes, their states, and the plan of changes one event produces."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from aetr.domain.steps import StepConfig

NodeState = Literal["pending", "executing", "complete", "error", "cancelled", "skipped"]
TERMINAL: frozenset[str] = frozenset({"complete", "error", "cancelled", "skipped"})
ErrorKind = Literal["http", "timeout", "callback", "mapper", "reducer", "cancelled", "signal"]
DEFAULT_MAX_TREE_NODES = 200_000  # run nodes a stored tree (or a map's items) may resolve to (AETR_MAX_TREE_NODES)


@dataclass(frozen=True)
class Node:
    """One node of a run tree: a step frozen into the run, with its state and data."""

    id: str
    root_id: str
    parent_id: str | None
    position: int
    step: StepConfig
    mapper: str | None
    n_children: int
    created_at: datetime
    state: NodeState = "pending"
    input: Any = None
    output: Any = None
    error: dict[str, Any] | None = None
    attempt: int = 0
    attempt_base: int = 0  # attempts made before the latest redrive: each redrive gets a fresh retry budget
    version: int = 0
    started_at: datetime | None = None
    completed_at: datetime | None = None
    wait_until: datetime | None = None  # when a timed wait ends
    awaits_signal: bool = False  # a signal wait, waiting for its answer while executing
    holds_slot: bool = False  # an api step with max_concurrency: its current attempt holds one of its slots
    notify: str | None = None  # a run's root: where the run's end is announced (a CloudEvent POSTed to it)
    trace: str | None = None  # a traced run's root: its span's context (aetr.engine.tracing writes and reads it)

    @property
    def terminal(self) -> bool:
        """Whether the node will change no more (short of a redrive)."""
        return self.state in TERMINAL


NODE_FIELDS: frozenset[str] = frozenset(f.name for f in dataclasses.fields(Node))


def node_of(fields: dict[str, Any]) -> Node:
    """A Node from a dict of every one of its fields, taken as its own (not copied).

    What Node(**fields) does, without the frozen dataclass's field-by-field __init__: the store makes a
    Node from every row it reads, and Node has no __post_init__ to skip.
    """
    node = object.__new__(Node)
    object.__setattr__(node, "__dict__", fields)
    return node


def evolve(node: Node, changes: dict[str, Any]) -> Node:
    """`node` with `changes`: dataclasses.replace, without its walk over the fields on every call."""
    if not changes.keys() <= NODE_FIELDS:
        raise TypeError(f"Node has no field {sorted(changes.keys() - NODE_FIELDS)}")
    return node_of({**node.__dict__, **changes})


@dataclass(frozen=True)
class Work:
    """Something to do later, stored with the state change that implies it (the outbox)."""

    kind: Literal["dispatch", "deadline", "heartbeat", "count", "complete", "timer", "queued", "grow", "notify"]
    # A `count` row names the parent whose counter it bumps; a `notify` row, its notification (aetr.domain.notify).
    node_id: str
    root_id: str
    attempt: int  # a `count` row holds the finished child's position: one row per child; a `notify` row, its tries
    due_at: datetime


@dataclass(frozen=True)
class EventRecord:
    """One line of a run's history."""

    root_id: str
    node_id: str | None
    kind: str
    data: dict[str, Any]
    at: datetime


@dataclass
class Counters:
    """The counters of a counting parent created by the event at hand (stored ones are counted by the store)."""

    done: int = 0  # children finished
    failed: int = 0  # a map's failed items
    next_item: int = 0  # the next item position a map with max_concurrency may start
    items: list[Any] | None = None  # a map's items still to be made into nodes, by later events


@dataclass
class Plan:
    """The working set of one event: nodes read so far, the changes made, and the work and history implied.

    The store writes `changed` nodes under their `loaded_versions` (optimistic locking), inserts `work`,
    deletes the pending work of `drop_work_for` (every kind) and `drop_heartbeats_for` (heartbeat deadlines
    only) and appends `events`, all in the event's transaction. `jitter` in [0, 1] scales retry backoff
    ("full jitter"); the coordinator draws it at random, tests fix it.
    """

    now: datetime
    nodes: dict[str, Node] = field(default_factory=dict)
    children: dict[str, list[str]] = field(default_factory=dict)
    loaded_versions: dict[str, int] = field(default_factory=dict)
    work: list[Work] = field(default_factory=list)
    drop_work_for: set[str] = field(default_factory=set)
    drop_heartbeats_for: set[str] = field(default_factory=set)
    jitter: float = 1.0
    events: list[EventRecord] = field(default_factory=list)
    whole_run: bool = False  # every node of the run is in `nodes`, every child list in `children`
    # Count finished children in the event's write (`counted`, as (parent id, root id)) instead of bumping
    # the parent's counter when the child ends: on PostgreSQL that bump would hold the counter's row lock until
    # the commit, through the rest of the event, and a wide parallel parent's siblings would finish one at a
    # time. The write that counts the last child stores the parent's `complete` row; the parent completes in
    # an event of its own, right after.
    count_later: bool = False
    counted: list[tuple[str, str]] = field(default_factory=list)
    # Nodes this event creates (a new run's, a map's items), written in their final state at its commit; the
    # plan, not a read, is the truth about them. `counters` are the counting parents' among them, `new_children`
    # the children this event gave to parents (a read of their children would not find those).
    inserted: dict[str, None] = field(default_factory=dict)
    counters: dict[str, Counters] = field(default_factory=dict)
    new_children: dict[str, list[str]] = field(default_factory=dict)
    batch: int = 1000  # a map makes at most this many item subtrees per event
    new_id: Callable[[], str] | None = None  # where new node ids come from, when this event may create nodes
    max_nodes: int = DEFAULT_MAX_TREE_NODES  # a map may not create more nodes than this at once
    # Slots this event frees (an attempt that held one ended), as (step id, node id): each goes to the attempt
    # of its step that waited longest, in the same transaction. `forget`: work rows to delete, as (kind, node
    # id, attempt).
    released: list[tuple[str, str]] = field(default_factory=list)
    # Slots of steps taken by this event's attempts (not yet in the database's count), and the queued attempts
    # it sets aside at once, as (kind, node id, attempt): every slot was taken when they started.
    slots_taken: dict[str, int] = field(default_factory=dict)
    parked: set[tuple[str, str, int]] = field(default_factory=set)
    handed: set[str] = field(default_factory=set)  # nodes given a slot freed by this event (their calls are claimed)
    freed_slots: dict[str, int] = field(default_factory=dict)  # maps starting items in a loop: items to start
    advancing: dict[str, Node | None] = field(default_factory=dict)  # sequences moving on in a loop: child ended
    forget: list[tuple[str, str, int]] = field(default_factory=list)

    def drop_work(self, node_ids: set[str]) -> None:
        """Forget every pending work row of these nodes: those stored (deleted at the commit) and those this
        event queued for them before now (a child started, then cancelled when a later sibling's mapper threw:
        its call and its timer must not outlive the run). Rows queued after this stay, as a re-armed node's do."""
        self.drop_work_for |= node_ids
        if self.work:
            self.work[:] = [w for w in self.work if w.node_id not in node_ids]

    def absorb(self, rows: Iterable[Node], *, children_of: Iterable[str] = ()) -> None:
        """Add freshly read nodes; nodes this plan already changed keep the plan's version of them.

        `children_of` names the parents whose complete child lists are among `rows`.
        """
        rows = list(rows)
        for node in rows:
            if node.id not in self.loaded_versions:
                self.nodes[node.id] = node
        if not children_of:  # an event's chain: no child lists
            return
        complete = set(children_of) - self.counters.keys()
        lists: dict[str, list[Node]] = {p: [] for p in complete}
        for node in rows:
            if node.parent_id in complete:
                lists[node.parent_id].append(node)
        for parent_id, kids in lists.items():
            kids.extend(self.nodes[i] for i in self.new_children.get(parent_id, ()))
            self.children[parent_id] = [k.id for k in sorted(kids, key=lambda n: n.position)]

    def put(self, node: Node, **changes: Any) -> Node:
        """Change a node in the working set, recording a history line when its state moves."""
        old = self.nodes[node.id]
        if node.id not in self.loaded_versions:
            self.loaded_versions[node.id] = old.version
        changes["version"] = self.loaded_versions[node.id] + 1
        if old.awaits_signal and changes.get("state", "executing") != "executing":
            changes["awaits_signal"] = False  # answered, timed out or cancelled: it awaits nothing now
        if old.holds_slot:
            ended = changes.get("state", old.state) != "executing" or changes.get("attempt", old.attempt) != old.attempt
            if ended or changes.get("holds_slot") is False:
                changes["holds_slot"] = False  # the attempt that held it ended: the slot is free
                self.released.append((old.step.id, old.id))
        new = evolve(old, changes)
        self.nodes[node.id] = new
        if new.state != old.state:
            data: dict[str, Any] = {"from": old.state, "to": new.state, "step": new.step.name}
            if new.state == "error" and new.error is not None:
                data["error"] = new.error
            self.event(new, "state", data)
            if new.parent_id is None and new.notify is not None and new.terminal and not old.terminal:
                from aetr.domain.notify import run_ended  # it builds on this module

                run_ended(self, new)
        return new

    def event(self, node: Node | None, kind: str, data: dict[str, Any], root_id: str | None = None) -> None:
        """Append a history line about `node` (or about the run when node is None), naming the node's step."""
        rid = node.root_id if node is not None else root_id
        assert rid is not None
        if node is not None:
            data.setdefault("step", node.step.name)
        self.events.append(EventRecord(rid, node.id if node else None, kind, data, self.now))

    @property
    def changed(self) -> list[Node]:
        """The stored nodes this plan changed, in the order they were first changed."""
        return [self.nodes[i] for i in self.loaded_versions if i not in self.inserted]

    @property
    def created(self) -> list[Node]:
        """The nodes this plan creates, in their final state, parents before children."""
        return [self.nodes[i] for i in self.inserted]
