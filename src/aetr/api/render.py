"""Domain values as the API shows them (a node's fields are declared once, in aetr.store.views)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from aetr.domain.runs import Node
from aetr.store.views import nest, node_json

__all__ = ["nest", "node_json", "run_tree_json"]


def run_tree_json(nodes: Iterable[Node]) -> dict[str, Any]:
    """A whole run as a nested tree, children in position order."""
    return nest([node_json(n) for n in nodes])
