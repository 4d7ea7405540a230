"""A run node as the API shows it, declared once, and a run's nodes nested into its tree.

NODE_VIEW lists the fields in their order; everything that writes a node's JSON is derived from it: the
Python builders below (from a Node, and from a row of VIEW_COLUMNS as GET /runs reads it), and SQLite's
json_object text (aetr.store.sqlite_sql). A new field is a line in NODE_VIEW, plus its column (tables.py and
a migration) and its Node attribute.

The builders are generated from NODE_VIEW once, at import, as plain functions that build one dict literal:
they run once per node of a run read or started (10,000 for a wide run), where a loop over the fields cost a
Python call or more per field.
"""

from __future__ import annotations

import linecache
from collections.abc import Callable, Sequence
from typing import Any, Literal

import orjson

from aetr.domain.runs import Node
from aetr.store.tables import run_nodes

__all__ = ["NODE_VIEW", "STEP_VIEW", "VIEW_COLUMNS", "nest", "nest_json", "node_json", "view_of_row"]

Stored = Literal["plain", "json", "time", "bool", "step"]

# The node's fields in order, and how each is stored: "plain", a column as it is; "json", JSON text (shown
# as the JSON value it holds); "time", a UTC time (shown in ISO 8601, as orjson writes an aware datetime);
# "bool", a boolean (SQLite keeps 0 or 1);
# "step", the object of STEP_VIEW's fields, stored in the columns step_<field>.
NODE_VIEW: tuple[tuple[str, Stored], ...] = (
    ("id", "plain"), ("root_id", "plain"), ("parent_id", "plain"), ("position", "plain"), ("step", "step"),
    ("state", "plain"), ("input", "json"), ("output", "json"), ("error", "json"), ("attempt", "plain"),
    ("version", "plain"), ("created_at", "time"), ("started_at", "time"), ("completed_at", "time"),
    ("wait_until", "time"), ("awaits_signal", "bool"),
)
STEP_VIEW = ("id", "name", "kind", "version")


def view_columns() -> list[tuple[str, str, Stored]]:
    """(field, run_nodes column, how it is stored) for each column a node's view reads, in NODE_VIEW's order;
    the step's fields are named `step.<field>`."""
    columns: list[tuple[str, str, Stored]] = []
    for name, stored in NODE_VIEW:
        if stored == "step":
            columns.extend((f"step.{field}", f"step_{field}", "plain") for field in STEP_VIEW)
        else:
            columns.append((name, name, stored))
    return columns


VIEW_COLUMNS = [run_nodes.c[column] for _, column, _ in view_columns()]  # GET /runs reads only these


def _fragment(value: str | None) -> orjson.Fragment | None:
    return None if value is None else orjson.Fragment(value)


def _time_view(value: Any) -> Any:
    # SQLite keeps "YYYY-MM-DD HH:MM:SS.ffffff" (UTC): written out as orjson writes an aware datetime.
    if isinstance(value, str):
        return f"{value[:10]}T{value[11:].removesuffix('.000000')}+00:00"
    return value


def _dict_source(value_of: Callable[[str, str, Stored], str]) -> str:
    """The dict literal of a node's view, each field's value the expression `value_of(field, column, stored)`."""
    items = []
    for name, stored in NODE_VIEW:
        if stored == "step":
            step = ", ".join(f"{field!r}: {value_of(f'step.{field}', f'step_{field}', 'plain')}"
                             for field in STEP_VIEW)
            items.append(f"{name!r}: {{{step}}}")
        else:
            items.append(f"{name!r}: {value_of(name, name, stored)}")
    return "{" + ", ".join(items) + "}"


def _generated(name: str, source: str) -> Callable[..., Any]:
    """The function `name` defined by `source` (kept in linecache, so tracebacks show its lines)."""
    filename = f"<aetr.store.views.{name}>"
    linecache.cache[filename] = (len(source), None, source.splitlines(keepends=True), filename)
    namespace: dict[str, Any] = {"_fragment": _fragment, "_time_view": _time_view}
    exec(compile(source, filename, "exec"), namespace)
    function: Callable[..., Any] = namespace[name]
    return function


def _node_json_source() -> str:
    def value(field: str, _column: str, _stored: Stored) -> str:
        return "s." + field.removeprefix("step.") if field.startswith("step.") else f"node.{field}"

    return f"def node_json(node):\n    s = node.step\n    return {_dict_source(value)}\n"


def _view_of_row_source() -> str:
    names = {column: f"c{i}" for i, (_, column, _) in enumerate(view_columns())}

    def value(_field: str, column: str, stored: Stored) -> str:
        wrap = {"json": "_fragment", "time": "_time_view", "bool": "bool"}.get(stored)
        return f"{wrap}({names[column]})" if wrap else names[column]

    unpack = ", ".join(names.values())
    return f"def view_of_row(row):\n    ({unpack},) = row\n    return {_dict_source(value)}\n"


node_json: Callable[[Node], dict[str, Any]] = _generated("node_json", _node_json_source())
node_json.__doc__ = "One run node as the API shows it, without its children (orjson writes its times)."
view_of_row: Callable[[Sequence[Any]], dict[str, Any]] = _generated("view_of_row", _view_of_row_source())
view_of_row.__doc__ = ("A node as the API shows it, from a row of VIEW_COLUMNS on the raw driver: stored JSON "
                       "is passed through unparsed.")


def nest(flat: list[dict[str, Any]]) -> dict[str, Any]:
    """Nodes as the API shows them (each with `parent_id` and `position`) nested into their run tree."""
    by_parent: dict[str | None, list[dict[str, Any]]] = {}
    for n in flat:
        by_parent.setdefault(n["parent_id"], []).append(n)
    for kids in by_parent.values():
        kids.sort(key=lambda n: n["position"])
    (root,) = by_parent[None]
    stack = [root]
    while stack:  # iterative: a deep tree must not exhaust Python's recursion limit
        obj = stack.pop()
        obj["children"] = by_parent.get(obj["id"], [])
        stack.extend(obj["children"])
    return root


def nest_json(rows: Sequence[Sequence[Any]]) -> bytes:
    """The run tree's JSON from rows of (id, parent_id, position, the node's JSON text without `children`):
    each node's text with its children's texts in `children`, in position order, joined once (no text is
    copied per level of the tree)."""
    text_of: dict[str, str] = {}
    kids: dict[str | None, list[tuple[int, str]]] = {}
    for node_id, parent_id, position, node_text in rows:
        text_of[node_id] = node_text
        kids.setdefault(parent_id, []).append((position, node_id))
    ((_, root),) = kids[None]
    parts: list[str] = []
    stack: list[str] = [root]  # node ids to open, and the two markers below
    while stack:
        item = stack.pop()
        if item is _CLOSE or item is _COMMA:
            parts.append(item)
            continue
        node_text = text_of[item]
        parts.append(node_text[:node_text.rindex("}")])
        parts.append(',"children":[')
        stack.append(_CLOSE)
        children = sorted(kids.get(item, ()), reverse=True)  # the first child is popped first
        for i, (_, child) in enumerate(children):
            if i:
                stack.append(_COMMA)
            stack.append(child)
    return "".join(parts).encode()


_CLOSE = "]}"
_COMMA = ","
