"""SQLite's run listings read a page from an index, however many runs the file holds.

SQLite keeps no statistics unless asked, and on its own took a listing's `parent_id IS NULL` to an equality
on the index of nodes by parent: every root was read through it and sorted, 0.1 s a page with 50,000 runs and
growing with them. The plans, unlike time, do not depend on the machine.
"""

from __future__ import annotations

import sqlite3
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event

from aetr.store import open_store
from aetr.store.migrate import upgrade_engine


@pytest.mark.parametrize("filters", [{}, {"id_prefix": "0000"}, {"state": "error"}, {"step": "nightly"}])
async def test_a_page_of_runs_is_read_from_an_index_without_sorting_the_runs(tmp_path: Path,
                                                                            filters: dict[str, Any]) -> None:
    path = tmp_path / "aetr.db"
    store = open_store(f"sqlite:///{path}")
    await upgrade_engine(store.engine)
    with closing(sqlite3.connect(path)) as conn, conn:  # 2,000 runs of one step each
        conn.execute(
            "WITH RECURSIVE g(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM g WHERE n < 2000)"
            " INSERT INTO run_nodes (id, root_id, parent_id, position, step_id, step_name, step_kind, step_version,"
            " config, n_children, state, attempt, version, created_at)"
            " SELECT printf('%08x-0000-7000-8000-%012x', n, 0), printf('%08x-0000-7000-8000-%012x', n, 0), NULL, 0,"
            " 's', 'nightly', 'sequential', 1, '{}', 1, 'complete', 0, 1, datetime('now', printf('-%d seconds', n))"
            " FROM g")
        conn.execute(
            "INSERT INTO run_nodes (id, root_id, parent_id, position, step_id, step_name, step_kind, step_version,"
            " config, n_children, state, attempt, version, created_at)"
            " SELECT substr(id, 1, 24) || '000000000001', id, id, 0, 's', 'leaf', 'api', 1, '{}', 0, 'complete', 0,"
            " 1, created_at FROM run_nodes")
    sent: list[tuple[str, Any]] = []

    def record(_conn: Any, _cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        if "FROM run_nodes" in statement:
            sent.append((statement, parameters))

    event.listen(store.engine.sync_engine, "before_cursor_execute", record)
    try:
        page = await store.list_runs(filters.get("state"), filters.get("step"), 50, None, filters.get("id_prefix"))
    finally:
        await store.close()
    assert len(page.runs) == (0 if filters.get("state") else 50)
    ((statement, parameters),) = sent
    with closing(sqlite3.connect(path)) as conn:
        plan = " / ".join(row[3] for row in conn.execute(f"EXPLAIN QUERY PLAN {statement}", parameters))
    assert "TEMP B-TREE" not in plan and "ix_run_nodes_parent" not in plan, plan
