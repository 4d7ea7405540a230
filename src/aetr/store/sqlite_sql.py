"""SQLite's own statements and values: times stored as text, and GET /runs's node JSON written by SQLite."""

from __future__ import annotations

import functools
from datetime import UTC, datetime
from typing import Any, ClassVar

from aetr.store.operations import DialectName, Sql
from aetr.store.statements import Statements
from aetr.store.views import NODE_VIEW, STEP_VIEW


def _when(col: str) -> str:
    """A stored time as orjson writes an aware UTC datetime (see views._time_view)."""
    return (f"CASE WHEN {col} IS NULL THEN NULL"
            f" ELSE replace(substr({col}, 1, 10) || 'T' || substr({col}, 12), '.000000', '') || '+00:00' END")


def _node_json_sql() -> str:
    """json_object(...) of a node as the API shows it (views.NODE_VIEW), without `children`."""
    items = []
    for name, stored in NODE_VIEW:
        if stored == "step":
            value = "json_object(" + ", ".join(f"'{field}', step_{field}" for field in STEP_VIEW) + ")"
        elif stored == "json":
            value = f"json({name})"  # stored JSON goes out as it is
        elif stored == "time":
            value = _when(name)
        elif stored == "bool":
            value = f"json(CASE WHEN {name} THEN 'true' ELSE 'false' END)"
        else:
            value = name
        items.append(f"'{name}', {value}")
    return "json_object(" + ", ".join(items) + ")"


# Every node of the run a node belongs to, as (id, parent_id, position, the node's JSON as the API shows it
# without `children`), the JSON written by SQLite and only nested in Python (views.nest_json). On PostgreSQL
# the same answer built by json_build_object took 249 ms for 10,000 nodes against 207 ms from the plain
# columns, so PostgreSQL answers from run_view (Store.get_run_json).
RUN_JSON_SQLITE = (
    f"SELECT id, parent_id, position, {_node_json_sql()}"
    " FROM run_nodes WHERE root_id = (SELECT root_id FROM run_nodes WHERE id = ?)"
)


class SqliteStatements(Statements):
    """Statements for SQLite (sqlite3), whose times are naive UTC text, as SQLAlchemy writes them."""

    dialect: ClassVar[DialectName] = "sqlite"

    def __init__(self) -> None:
        super().__init__()
        self.run_json = Sql(RUN_JSON_SQLITE, ("node_id",), {}, writes=False)

    def time_in(self, at: datetime | None) -> Any:
        return None if at is None else sqlite_time(at)


def indexed_by(statement: str, index: str) -> str:
    """`statement` with its run_nodes read through `index` (SQLite has no statistics to choose it by)."""
    return statement.replace("FROM run_nodes", f"FROM run_nodes INDEXED BY {index}", 1)


@functools.lru_cache(maxsize=1024)
def sqlite_time(at: datetime) -> str:
    """A time as SQLite's columns hold it (as SQLAlchemy's DateTime writes it)."""
    # An event writes one time many times over (its `now`, in each history line, work row and node).
    if at.tzinfo is not UTC:
        at = at.astimezone(UTC)
    return at.isoformat(sep=" ", timespec="microseconds")[:26]  # without its "+00:00"
