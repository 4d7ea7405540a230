"""Domain values as the API shows them."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from aetr.domain.runs import Node
from aetr.store.sql import nest

__all__ = ["nest", "node_json", "run_tree_json"]


def node_json(node: Node) -> dict[str, Any]:
    """One run node without its children."""
    s = node.step
    return {"id": node.id, "root_id": node.root_id, "parent_id": node.parent_id, "position": node.position,
            "step": {"id": s.id, "name": s.name, "kind": s.kind, "version": s.version},
            "state": node.state, "input": node.input, "output": node.output, "error": node.error,
            "attempt": node.attempt, "version": node.version, "created_at": node.created_at,
            "started_at": node.started_at, "completed_at": node.completed_at}


def run_tree_json(nodes: Iterable[Node]) -> dict[str, Any]:
    """A whole run as a nested tree, children in position order."""
    return nest([node_json(n) for n in nodes])
