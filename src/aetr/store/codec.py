"""Rows that SQLAlchemy read (JSON parsed, times typed) as domain values, for the colder paths (run listings)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from aetr.domain.runs import Node
from aetr.domain.steps import StepConfig
from aetr.store.sql import NODE_COLUMNS

__all__ = ["NODE_COLUMNS", "node_from_row"]


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
