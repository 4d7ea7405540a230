"""Retention: ended runs found by their end time, and runs whose end notification is still being delivered.

Deleting runs that ended before a time reads the ended roots in end-time order through an index holding one
row a run (partial: roots with an end time only), never the nodes; a run whose `notify` work row is still there
is kept until its delivery is done or given up, which the second index answers by the run's id.

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_run_nodes_ended", "run_nodes", ["completed_at"],
                    postgresql_where=sa.text("parent_id IS NULL AND completed_at IS NOT NULL"),
                    sqlite_where=sa.text("parent_id IS NULL AND completed_at IS NOT NULL"))
    op.create_index("ix_work_notify", "work", ["root_id"], postgresql_where=sa.text("kind = 'notify'"),
                    sqlite_where=sa.text("kind = 'notify'"))


def downgrade() -> None:
    op.drop_index("ix_work_notify", table_name="work")
    op.drop_index("ix_run_nodes_ended", table_name="run_nodes")
