"""The row codec: domain values to and from run_nodes, work and events rows, on the raw driver and through
SQLAlchemy (the colder paths, whose rows come typed: JSON parsed, times aware).

`RowCodec` is the hot path's half: the events' `Statements` are one (aetr.store.statements), and a backend
whose driver wants other values (SQLite's times as text) overrides only those methods.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import orjson

from aetr.domain.runs import EventRecord, Node, Work, node_of
from aetr.domain.steps import StepConfig
from aetr.store.tables import run_nodes

__all__ = ["NODE_COLUMNS", "STATE_COLUMNS", "RowCodec", "node_from_row"]

NODE_COLUMNS = [c for c in run_nodes.c if c.name != "snapshot"]  # the snapshot is only read by GET /runs
# The columns an event may change on a node (RowCodec.state_values).
STATE_COLUMNS = ("state", "input", "output", "error", "attempt", "attempt_base", "version", "started_at",
                 "completed_at", "n_children", "wait_until", "awaits_signal", "holds_slot")


class RowCodec:
    """Values to and from the raw driver (asyncpg's: aware datetimes both ways)."""

    def time_in(self, at: datetime | None) -> Any:
        """A timezone-aware datetime as the driver stores it."""
        return at

    def time_out(self, value: Any) -> datetime | None:
        """A stored time as a timezone-aware UTC datetime."""
        if value is None:
            return None
        if isinstance(value, str):
            return _time_from_text(value)
        assert isinstance(value, datetime)
        if value.tzinfo is UTC:  # asyncpg's timestamptz
            return value
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)

    def node(self, row: Sequence[Any]) -> Node:
        """A Node from a row of NODE_COLUMNS."""
        (id_, root_id, parent_id, position, step_id, step_name, step_kind, step_version, config, mapper,
         n_children, state, input_, output, error, attempt, attempt_base, version, created_at, started_at,
         completed_at, _key, wait_until, awaits_signal, holds_slot, notify, trace) = row
        time_out = self.time_out
        return node_of({"id": id_, "root_id": root_id, "parent_id": parent_id, "position": position,
                        "step": _step(step_name, step_kind, config, step_id, step_version), "mapper": mapper,
                        "n_children": n_children, "created_at": time_out(created_at), "state": state,
                        "input": _json_out(input_), "output": _json_out(output), "error": _json_out(error),
                        "attempt": attempt, "attempt_base": attempt_base, "version": version,
                        "started_at": time_out(started_at), "completed_at": time_out(completed_at),
                        "wait_until": time_out(wait_until), "awaits_signal": bool(awaits_signal),
                        "holds_slot": bool(holds_slot), "notify": notify, "trace": trace})

    def state_values(self, node: Node) -> dict[str, Any]:
        """The columns an event may change on a node (STATE_COLUMNS), as driver values."""
        return {"state": node.state, "input": _json_in(node.input), "output": _json_in(node.output),
                "error": _json_in(node.error), "attempt": node.attempt, "attempt_base": node.attempt_base,
                "version": node.version, "started_at": self.time_in(node.started_at),
                "completed_at": self.time_in(node.completed_at), "n_children": node.n_children,
                "wait_until": self.time_in(node.wait_until), "awaits_signal": node.awaits_signal,
                "holds_slot": node.holds_slot}

    def event_values(self, e: EventRecord) -> dict[str, Any]:
        """An events row."""
        return {"root_id": e.root_id, "node_id": e.node_id, "at": self.time_in(e.at), "kind": e.kind,
                "data": orjson.dumps(e.data).decode()}

    def work_values(self, w: Work, owner: str | None = None, until: datetime | None = None) -> dict[str, Any]:
        """A work row, leased to `owner` until `until` when it will be performed at once by this process."""
        return {"kind": w.kind, "node_id": w.node_id, "root_id": w.root_id, "attempt": w.attempt,
                "due_at": self.time_in(w.due_at), "lease_owner": owner, "lease_until": self.time_in(until)}


assert [c.name for c in NODE_COLUMNS] == [
    "id", "root_id", "parent_id", "position", "step_id", "step_name", "step_kind", "step_version", "config",
    "mapper", "n_children", "state", "input", "output", "error", "attempt", "attempt_base", "version",
    "created_at", "started_at", "completed_at", "idempotency_key", "wait_until", "awaits_signal", "holds_slot",
    "notify", "trace",
], "RowCodec.node unpacks these"


def node_from_row(row: Mapping[Any, Any]) -> Node:
    """A Node from a run_nodes row that SQLAlchemy read (JSON parsed, times typed): the run listings."""
    step = StepConfig.from_json(row["step_name"], row["step_kind"], row["config"], id=row["step_id"],
                                version=row["step_version"])
    return Node(
        id=row["id"], root_id=row["root_id"], parent_id=row["parent_id"], position=row["position"],
        step=step, mapper=row["mapper"], n_children=row["n_children"], created_at=row["created_at"],
        state=row["state"], input=row["input"], output=row["output"], error=row["error"],
        attempt=row["attempt"], attempt_base=row["attempt_base"], version=row["version"], started_at=row["started_at"],
        completed_at=row["completed_at"], wait_until=row["wait_until"], awaits_signal=bool(row["awaits_signal"]),
        holds_slot=bool(row["holds_slot"]), notify=row["notify"], trace=row["trace"],
    )


@functools.lru_cache(maxsize=4096)
def _time_from_text(value: str) -> datetime:
    # SQLite's text times. A run's nodes share their created_at, and an event's changes their `now`.
    return datetime.fromisoformat(value).replace(tzinfo=UTC)


def _json_in(value: Any) -> str | None:
    """A JSON value as the text stored for it."""
    return None if value is None else orjson.dumps(value).decode()


def _json_out(value: str | None) -> Any:
    if value is None:
        return None
    if len(value) > BIG_JSON:
        return _big_json(value)
    return orjson.loads(value)


BIG_JSON = 8192  # characters of stored JSON past which a decoded value is kept for the next reads of it


@functools.lru_cache(maxsize=32)
def _big_json(value: str) -> Any:
    # Every event of a map's item reads the map node in its chain, and with it the map's input: the whole list
    # of items. Parsing it again each time cost 0.4 ms at 10,000 items and 7 ms at 100,000, once per item:
    # O(n²). Hashing the text to find it here costs a twentieth of that. The value is shared by the events that
    # read it: the engine never changes a stored value in place.
    return orjson.loads(value)


@functools.lru_cache(maxsize=4096)
def _step(name: str, kind: str, config: str, step_id: str, version: int) -> StepConfig:
    # Siblings of a wide parallel parent share one step: parse its config once, not once per child.
    return StepConfig.from_json(name, kind, orjson.loads(config), id=step_id, version=version)
