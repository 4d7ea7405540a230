"""Runs found by the start of their id: an index on the ids of root nodes only.

`GET /runs?id_prefix=` reads the run ids in a range (`id >= prefix AND id < next prefix`); the primary key
would answer it too, but through every node of every run in the range, where this index holds one row a run.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_run_nodes_root_ids", "run_nodes", ["id"], postgresql_where=sa.text("parent_id IS NULL"),
                    sqlite_where=sa.text("parent_id IS NULL"))


def downgrade() -> None:
    op.drop_index("ix_run_nodes_root_ids", table_name="run_nodes")
