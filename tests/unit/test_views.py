"""A run node's view is declared once (aetr.store.views.NODE_VIEW): every builder writes the same JSON."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime

import orjson
from sqlalchemy import create_engine

from aetr.domain.kinds import ApiSpec
from aetr.domain.runs import Node
from aetr.domain.steps import StepConfig
from aetr.store.sqlite_sql import SqliteStatements
from aetr.store.tables import metadata
from aetr.store.views import NODE_VIEW, VIEW_COLUMNS, nest, nest_json, node_json, view_of_row


def _node(**changes: object) -> Node:
    fields: dict[str, object] = {
        "id": "n1", "root_id": "n1", "parent_id": None, "position": 0, "mapper": None, "n_children": 0,
        "step": StepConfig(name="hello", spec=ApiSpec(url="http://127.0.0.1:1/step"), id="s1", version=3),
        "created_at": datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC), "state": "complete", "input": {"a": [1, "é"]},
        "output": {"ok": True}, "error": None, "attempt": 2,
        "started_at": datetime(2026, 1, 2, 3, 4, 5, 120000, tzinfo=UTC), "completed_at": None}
    fields.update(changes)
    return Node(**fields)  # type: ignore[arg-type]


def test_every_builder_writes_a_node_as_node_json_does(tmp_path: object) -> None:
    node = _node()
    expected = orjson.dumps(node_json(node))
    assert list(orjson.loads(expected)) == [name for name, _ in NODE_VIEW]

    path = f"{tmp_path}/views.db"
    schema = create_engine(f"sqlite:///{path}")
    metadata.create_all(schema)
    schema.dispose()
    st = SqliteStatements()
    row = {
        "id": node.id, "root_id": node.root_id, "parent_id": node.parent_id, "position": node.position,
        "step_id": node.step.id, "step_name": node.step.name, "step_kind": node.step.kind,
        "step_version": node.step.version, "config": node.step.fields_text, "mapper": node.mapper,
        "n_children": node.n_children, "created_at": st.time_in(node.created_at), "snapshot": None,
        "idempotency_key": None, "notify": None, "trace": None, **st.state_values(node)}
    conn = sqlite3.connect(path)
    conn.execute(st.insert_node.text, st.insert_node.args(row))
    # GET /runs on PostgreSQL (and the UI's stream): the plain columns, written by view_of_row.
    (viewed,) = conn.execute(f"SELECT {', '.join(c.name for c in VIEW_COLUMNS)} FROM run_nodes").fetchall()
    assert orjson.dumps(view_of_row(viewed)) == expected
    # GET /runs on SQLite: the JSON written by SQLite itself.
    assert st.run_json is not None
    rows = conn.execute(st.run_json.text, st.run_json.args({"node_id": node.id})).fetchall()
    assert nest_json(rows) == orjson.dumps(nest([node_json(node)]))
    conn.close()
