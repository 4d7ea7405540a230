"""Schedules: runs started by the clock, and the due times their tickers claimed.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from aetr.store.tables import JSONText, UTCDateTime

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "schedules",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("name", sa.String(200), nullable=False, unique=True),
        sa.Column("step", sa.String(200), nullable=False),
        sa.Column("cron", sa.String(200), nullable=False),
        sa.Column("timezone", sa.String(64), nullable=False),
        sa.Column("enabled", sa.Boolean(), nullable=False),
        sa.Column("input", JSONText, nullable=True),
        sa.Column("notify", sa.Text(), nullable=True),
        sa.Column("next_run_at", UTCDateTime, nullable=True),
        sa.Column("created_at", UTCDateTime, nullable=False),
        sa.Column("updated_at", UTCDateTime, nullable=False),
    )
    op.create_index("ix_schedules_next_run", "schedules", ["next_run_at"])
    op.create_table(
        "schedule_runs",
        sa.Column("schedule_id", sa.String(36), primary_key=True),
        sa.Column("due_at", UTCDateTime, primary_key=True),
        sa.Column("claimed_at", UTCDateTime, nullable=False),
        sa.Column("run_id", sa.String(36), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
    )
    op.create_index("ix_schedule_runs_pending", "schedule_runs", ["claimed_at"],
                    postgresql_where=sa.text("run_id IS NULL AND error IS NULL"),
                    sqlite_where=sa.text("run_id IS NULL AND error IS NULL"))


def downgrade() -> None:
    op.drop_index("ix_schedule_runs_pending", table_name="schedule_runs")
    op.drop_table("schedule_runs")
    op.drop_index("ix_schedules_next_run", table_name="schedules")
    op.drop_table("schedules")
