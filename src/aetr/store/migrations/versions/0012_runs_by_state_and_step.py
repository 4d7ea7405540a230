"""Runs listed by state or by step, newest first, read from an index of their own.

`GET /runs?state=` and `?step=` walked the newest-first index of all runs and kept those that matched: with a
million ended runs, a state no run was in (`executing` on a quiet night) read every run, 0.4 s. These partial
indexes hold one row per run (roots only), ordered as the listing is.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None

ROOTS = sa.text("parent_id IS NULL")


def upgrade() -> None:
    op.create_index("ix_run_nodes_roots_by_state", "run_nodes", ["state", "created_at", "id"],
                    postgresql_where=ROOTS, sqlite_where=ROOTS)
    op.create_index("ix_run_nodes_roots_by_step", "run_nodes", ["step_name", "created_at", "id"],
                    postgresql_where=ROOTS, sqlite_where=ROOTS)


def downgrade() -> None:
    op.drop_index("ix_run_nodes_roots_by_step", table_name="run_nodes")
    op.drop_index("ix_run_nodes_roots_by_state", table_name="run_nodes")
