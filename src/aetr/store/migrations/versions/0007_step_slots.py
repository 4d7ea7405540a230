"""Step slots as rows: one row a slot of each step with max_concurrency, so that on PostgreSQL attempts take
and free slots without waiting on each other (0006 counted holders under a lock held until each commit).

Attempts that hold a slot when this runs are given rows of their own.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from aetr.store.tables import ID, UTCDateTime

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "step_slots",
        sa.Column("step_id", ID, primary_key=True),
        sa.Column("slot", sa.Integer(), primary_key=True),
        sa.Column("holder_id", ID, nullable=True),
        sa.Column("holder_attempt", sa.Integer(), nullable=True),
        sa.Column("taken_at", UTCDateTime, nullable=True),
    )
    op.create_index("ix_step_slots_holder", "step_slots", ["holder_id"],
                    postgresql_where=sa.text("holder_id IS NOT NULL"), sqlite_where=sa.text("holder_id IS NOT NULL"))
    # The holders of the moment, numbered from 0 within each step; free rows are made when a step next needs them.
    op.execute(
        "INSERT INTO step_slots (step_id, slot, holder_id, holder_attempt, taken_at)"
        " SELECT step_id, row_number() OVER (PARTITION BY step_id ORDER BY id) - 1, id, attempt, started_at"
        " FROM run_nodes WHERE holds_slot")


def downgrade() -> None:
    op.drop_index("ix_step_slots_holder", table_name="step_slots")
    op.drop_table("step_slots")
