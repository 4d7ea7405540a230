"""Rows to domain values and back: the one place that knows both column names and dataclass fields."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from aetr.domain.runs import Node
from aetr.domain.steps import StepConfig
from aetr.store.tables import run_nodes

# Every node column but the snapshot, which only the root carries and only `GET /runs/{id}` needs.
NODE_COLUMNS = [c for c in run_nodes.c if c.name != "snapshot"]


def node_from_row(row: Mapping[Any, Any]) -> Node:
    """A Node from a run_nodes row."""
    step = StepConfig.from_json(row["step_name"], row["step_kind"], row["config"], id=row["step_id"],
                                version=row["step_version"])
    return Node(
        id=row["id"], root_id=row["root_id"], parent_id=row["parent_id"], position=row["position"],
        step=step, mapper=row["mapper"], n_children=row["n_children"], created_at=row["created_at"],
        state=row["state"], input=row["input"], output=row["output"], error=row["error"],
        attempt=row["attempt"], attempt_base=row["attempt_base"], version=row["version"], started_at=row["started_at"],
        completed_at=row["completed_at"],
    )


def node_state_values(node: Node) -> dict[str, Any]:
    """The columns an event may change on a node."""
    return {"state": node.state, "input": node.input, "output": node.output, "error": node.error,
            "attempt": node.attempt, "attempt_base": node.attempt_base, "version": node.version,
            "started_at": node.started_at, "completed_at": node.completed_at}


def node_insert_values(node: Node) -> dict[str, Any]:
    """Every column of a new node row."""
    return {
        "id": node.id, "root_id": node.root_id, "parent_id": node.parent_id, "position": node.position,
        "step_id": node.step.id, "step_name": node.step.name, "step_kind": node.step.kind,
        "step_version": node.step.version, "config": node.step.fields_json(), "mapper": node.mapper,
        "n_children": node.n_children, "created_at": node.created_at,
        "snapshot": None, "idempotency_key": None, **node_state_values(node),
    }
