"""Finished-children counters in a narrow table of their own; work.lease_until indexed; roots by time, partial.

A parent's counter was a column of its run_nodes row, so each of a wide parallel parent's 10,000 callbacks
rewrote the whole row (on SQLite every column, the root's snapshot of the tree included: megabytes per
bump). The lease index makes "when is the next row due" two index lookups rather than a table scan. The index
of runs by time began with parent_id, and PostgreSQL took it to find a node's next sibling, filtering every
sibling by position; it now covers root rows only.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-27
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_work_lease", "work", ["lease_until", "due_at"])
    op.create_table(
        "run_counters",
        sa.Column("node_id", sa.String(36), primary_key=True),
        sa.Column("done", sa.Integer, nullable=False),
    )
    op.execute("INSERT INTO run_counters (node_id, done) SELECT id, done_children FROM run_nodes WHERE n_children > 0")
    with op.batch_alter_table("run_nodes") as batch:
        batch.drop_column("done_children")
    op.drop_index("ix_run_nodes_roots_by_time", table_name="run_nodes")
    op.create_index("ix_run_nodes_roots", "run_nodes", ["created_at", "id"],
                    postgresql_where=sa.text("parent_id IS NULL"), sqlite_where=sa.text("parent_id IS NULL"))


def downgrade() -> None:
    op.drop_index("ix_run_nodes_roots", table_name="run_nodes")
    op.create_index("ix_run_nodes_roots_by_time", "run_nodes", ["parent_id", "created_at"])
    with op.batch_alter_table("run_nodes") as batch:
        batch.add_column(sa.Column("done_children", sa.Integer, nullable=False, server_default="0"))
    op.execute("UPDATE run_nodes SET done_children = (SELECT done FROM run_counters WHERE node_id = run_nodes.id)"
               " WHERE id IN (SELECT node_id FROM run_counters)")
    op.drop_table("run_counters")
    op.drop_index("ix_work_lease", table_name="work")
