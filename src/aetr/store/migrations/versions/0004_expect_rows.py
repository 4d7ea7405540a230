"""PostgreSQL: aetr_expect_rows(), which aborts the statement it runs in when fewer rows changed than expected.

An event's writes are one statement on PostgreSQL, so it can run without BEGIN and COMMIT, as long as a
lost optimistic-lock race still undoes all of it: the statement ends by checking how many nodes it updated
under their read versions, and this function raises a serialization failure (SQLSTATE 40001, which the store
treats as a lost race) when it was not all of them. Nothing on SQLite, where events share one writer.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-27
"""

from __future__ import annotations

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute("""
CREATE FUNCTION aetr_expect_rows(got bigint, expected integer) RETURNS bigint
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
  IF got <> expected THEN
    RAISE EXCEPTION USING ERRCODE = 'serialization_failure',
      MESSAGE = format('%s of %s nodes changed meanwhile', expected - got, expected);
  END IF;
  RETURN got;
END
$$""")


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute("DROP FUNCTION aetr_expect_rows(bigint, integer)")
