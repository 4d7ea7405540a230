"""A traced run's span context, kept on the run's root row.

A run can last for days and end in another process than the one that started it: its span is exported when
it ends, under the trace id and span id chosen at its start, which this column holds (NULL for a run started
while tracing was off). Its form is aetr.engine.tracing's to define.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("run_nodes") as batch:
        batch.add_column(sa.Column("trace", sa.String(80), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("run_nodes") as batch:
        batch.drop_column("trace")
