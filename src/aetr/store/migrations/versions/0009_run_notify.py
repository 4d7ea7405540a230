"""A run's notify URL: where AETR announces the run's end (a CloudEvent), kept on the run's root row.

Its deliveries are `notify` work rows, which need no column of their own: the row's node_id is the
notification's id and its attempt the tries made so far.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("run_nodes") as batch:
        batch.add_column(sa.Column("notify", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("run_nodes") as batch:
        batch.drop_column("notify")
