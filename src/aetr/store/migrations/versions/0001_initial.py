"""The first schema: steps, step_children, run_nodes, work, events, settings.

Revision ID: 0001
Revises:
Create Date: 2026-11-27
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from aetr.store.tables import JSONText, UTCDateTime

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

BIGID = sa.BigInteger().with_variant(sa.Integer, "sqlite")


def upgrade() -> None:
    op.create_table(
        "steps",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("name", sa.String(200), nullable=False, unique=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("config", JSONText, nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("created_at", UTCDateTime, nullable=False),
        sa.Column("updated_at", UTCDateTime, nullable=False),
    )
    op.create_table(
        "step_children",
        sa.Column("parent_id", sa.String(36), sa.ForeignKey("steps.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("position", sa.Integer, primary_key=True),
        sa.Column("child_id", sa.String(36), sa.ForeignKey("steps.id"), nullable=False),
        sa.Column("mapper", sa.Text, nullable=True),
    )
    op.create_index("ix_step_children_child", "step_children", ["child_id"])
    op.create_table(
        "run_nodes",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("root_id", sa.String(36), nullable=False),
        sa.Column("parent_id", sa.String(36), nullable=True),
        sa.Column("position", sa.Integer, nullable=False),
        sa.Column("step_id", sa.String(36), nullable=False),
        sa.Column("step_name", sa.String(200), nullable=False),
        sa.Column("step_kind", sa.String(16), nullable=False),
        sa.Column("step_version", sa.Integer, nullable=False),
        sa.Column("config", JSONText, nullable=False),
        sa.Column("mapper", sa.Text, nullable=True),
        sa.Column("n_children", sa.Integer, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("input", JSONText, nullable=True),
        sa.Column("output", JSONText, nullable=True),
        sa.Column("error", JSONText, nullable=True),
        sa.Column("attempt", sa.Integer, nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("done_children", sa.Integer, nullable=False),
        sa.Column("created_at", UTCDateTime, nullable=False),
        sa.Column("started_at", UTCDateTime, nullable=True),
        sa.Column("completed_at", UTCDateTime, nullable=True),
        sa.Column("snapshot", JSONText, nullable=True),
        sa.Column("idempotency_key", sa.String(200), nullable=True, unique=True),
    )
    op.create_index("ix_run_nodes_root", "run_nodes", ["root_id"])
    op.create_index("ix_run_nodes_parent", "run_nodes", ["parent_id", "position"])
    op.create_index("ix_run_nodes_roots_by_time", "run_nodes", ["parent_id", "created_at"])
    op.create_table(
        "work",
        sa.Column("id", BIGID, primary_key=True, autoincrement=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("node_id", sa.String(36), nullable=False),
        sa.Column("root_id", sa.String(36), nullable=False),
        sa.Column("attempt", sa.Integer, nullable=False),
        sa.Column("due_at", UTCDateTime, nullable=False),
        sa.Column("lease_owner", sa.String(64), nullable=True),
        sa.Column("lease_until", UTCDateTime, nullable=True),
    )
    op.create_index("ix_work_due", "work", ["due_at"])
    op.create_index("ix_work_node", "work", ["node_id"])
    op.create_table(
        "events",
        sa.Column("id", BIGID, primary_key=True, autoincrement=True),
        sa.Column("root_id", sa.String(36), nullable=False),
        sa.Column("node_id", sa.String(36), nullable=True),
        sa.Column("at", UTCDateTime, nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("data", JSONText, nullable=False),
    )
    op.create_index("ix_events_root", "events", ["root_id", "id"])
    op.create_table(
        "settings",
        sa.Column("key", sa.String(64), primary_key=True),
        sa.Column("value", sa.Text, nullable=False),
    )


def downgrade() -> None:
    for table in ("settings", "events", "work", "run_nodes", "step_children", "steps"):
        op.drop_table(table)
