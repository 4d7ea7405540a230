"""Waits, maps and step slots: when a node's wait ends, whether it awaits a signal, whether its attempt holds
a slot of its step (max_concurrency), and a map's failed and started items.

`run_nodes.wait_until` and `run_nodes.awaits_signal` are shown on a wait's node. A map counts its failed
items (`tolerated_failures`) and the next item it may start (`max_concurrency`) next to its finished
children, in `run_counters`, so that items finishing at once in several transactions each take one.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from aetr.store.tables import UTCDateTime

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("run_nodes") as batch:
        batch.add_column(sa.Column("wait_until", UTCDateTime, nullable=True))
        batch.add_column(sa.Column("awaits_signal", sa.Boolean(), nullable=False, server_default=sa.false()))
        batch.add_column(sa.Column("holds_slot", sa.Boolean(), nullable=False, server_default=sa.false()))
    op.create_index("ix_run_nodes_slots", "run_nodes", ["step_id"], postgresql_where=sa.text("holds_slot"),
                    sqlite_where=sa.text("holds_slot"))
    op.create_index("ix_work_queued", "work", ["due_at"], postgresql_where=sa.text("kind = 'queued'"),
                    sqlite_where=sa.text("kind = 'queued'"))
    with op.batch_alter_table("run_counters") as batch:
        batch.add_column(sa.Column("failed", sa.Integer(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("next_item", sa.Integer(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("items", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("run_counters") as batch:
        batch.drop_column("items")
        batch.drop_column("next_item")
        batch.drop_column("failed")
    op.drop_index("ix_work_queued", table_name="work")
    op.drop_index("ix_run_nodes_slots", table_name="run_nodes")
    with op.batch_alter_table("run_nodes") as batch:
        batch.drop_column("holds_slot")
        batch.drop_column("awaits_signal")
        batch.drop_column("wait_until")
