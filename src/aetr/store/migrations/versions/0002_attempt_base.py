"""run_nodes.attempt_base: attempts made before the latest redrive, so each redrive gets a fresh retry budget.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("run_nodes") as batch:
        batch.add_column(sa.Column("attempt_base", sa.Integer, nullable=False, server_default="0"))


def downgrade() -> None:
    with op.batch_alter_table("run_nodes") as batch:
        batch.drop_column("attempt_base")
