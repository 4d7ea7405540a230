"""The database schema, declared once for SQLite and PostgreSQL (SQLAlchemy Core)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import orjson
from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Dialect,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    TypeDecorator,
    false,
    text,
)

metadata = MetaData()


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on both backends (SQLite keeps them as naive UTC text)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class JSONText(TypeDecorator[Any]):
    """A JSON value kept as text: we parse and write it ourselves with orjson, the same way on both backends."""

    impl = Text
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Dialect) -> str | None:
        return None if value is None else orjson.dumps(value).decode()

    def process_result_value(self, value: str | None, dialect: Dialect) -> Any:
        return None if value is None else orjson.loads(value)


ID = String(36)

steps = Table(
    "steps", metadata,
    Column("id", ID, primary_key=True),
    Column("name", String(200), nullable=False, unique=True),
    Column("kind", String(16), nullable=False),
    Column("config", JSONText, nullable=False),
    Column("version", Integer, nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
)

step_children = Table(
    "step_children", metadata,
    Column("parent_id", ID, ForeignKey("steps.id", ondelete="CASCADE"), primary_key=True),
    Column("position", Integer, primary_key=True),
    Column("child_id", ID, ForeignKey("steps.id"), nullable=False),
    Column("mapper", Text, nullable=True),
    Index("ix_step_children_child", "child_id"),
)

run_nodes = Table(
    "run_nodes", metadata,
    Column("id", ID, primary_key=True),
    Column("root_id", ID, nullable=False),
    Column("parent_id", ID, nullable=True),
    Column("position", Integer, nullable=False),
    Column("step_id", ID, nullable=False),
    Column("step_name", String(200), nullable=False),
    Column("step_kind", String(16), nullable=False),
    Column("step_version", Integer, nullable=False),
    Column("config", JSONText, nullable=False),
    Column("mapper", Text, nullable=True),
    Column("n_children", Integer, nullable=False),
    Column("state", String(16), nullable=False),
    Column("input", JSONText, nullable=True),
    Column("output", JSONText, nullable=True),
    Column("error", JSONText, nullable=True),
    Column("attempt", Integer, nullable=False),
    Column("attempt_base", Integer, nullable=False, server_default="0"),
    Column("version", Integer, nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    Column("started_at", UTCDateTime, nullable=True),
    Column("completed_at", UTCDateTime, nullable=True),
    Column("snapshot", JSONText, nullable=True),  # root only: the step tree frozen at start
    Column("idempotency_key", String(200), nullable=True, unique=True),  # root only
    Column("wait_until", UTCDateTime, nullable=True),  # a timed wait: when it ends
    Column("awaits_signal", Boolean, nullable=False, server_default=false()),  # a signal wait
    Column("holds_slot", Boolean, nullable=False, server_default=false()),  # its attempt holds a step's slot
    Column("notify", Text, nullable=True),  # root only: the URL the run's end is announced to
    Column("trace", String(80), nullable=True),  # root only, when traced: the run span's context (engine.tracing)
    Index("ix_run_nodes_root", "root_id"),
    # The attempts holding a slot of a step with max_concurrency, counted when another wants one.
    Index("ix_run_nodes_slots", "step_id", postgresql_where=text("holds_slot"), sqlite_where=text("holds_slot")),
    Index("ix_run_nodes_parent", "parent_id", "position"),
    # Runs newest first (GET /runs). Partial: an index that also began with parent_id was taken by PostgreSQL
    # for a node's next sibling, filtering every sibling by position (a 10,000-wide parent: 10,000 rows a step).
    Index("ix_run_nodes_roots", "created_at", "id", postgresql_where=text("parent_id IS NULL"),
          sqlite_where=text("parent_id IS NULL")),
    # Runs of one state or one step, newest first (GET /runs?state=, ?step=): a rare state or step would
    # otherwise be found by walking every run.
    Index("ix_run_nodes_roots_by_state", "state", "created_at", "id", postgresql_where=text("parent_id IS NULL"),
          sqlite_where=text("parent_id IS NULL")),
    Index("ix_run_nodes_roots_by_step", "step_name", "created_at", "id", postgresql_where=text("parent_id IS NULL"),
          sqlite_where=text("parent_id IS NULL")),
    # Runs by the start of their id (GET /runs?id_prefix=), as a range: only roots, so a prefix shared by a
    # big run's thousands of nodes costs nothing.
    Index("ix_run_nodes_root_ids", "id", postgresql_where=text("parent_id IS NULL"),
          sqlite_where=text("parent_id IS NULL")),
    # Ended runs by their end time (retention): one row a run that has ended.
    Index("ix_run_nodes_ended", "completed_at", postgresql_where=text("parent_id IS NULL AND completed_at IS NOT NULL"),
          sqlite_where=text("parent_id IS NULL AND completed_at IS NOT NULL")),
)

# A parent's count of finished children, only ever changed by an atomic `done = done + 1`: siblings finishing
# at the same moment never conflict on their parent's row version, and a bump rewrites 50 bytes, not the
# parent's row with its input (and the root's snapshot of the whole tree).
run_counters = Table(
    "run_counters", metadata,
    Column("node_id", ID, primary_key=True),
    Column("done", Integer, nullable=False),
    Column("failed", Integer, nullable=False, server_default="0"),  # a map's failed items
    Column("next_item", Integer, nullable=False, server_default="0"),  # the next item a limited map may start
    Column("items", Text, nullable=True),  # a map's items, JSON, while later events make them into nodes
)

work = Table(
    "work", metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("kind", String(16), nullable=False),
    Column("node_id", ID, nullable=False),
    Column("root_id", ID, nullable=False),
    Column("attempt", Integer, nullable=False),
    Column("due_at", UTCDateTime, nullable=False),
    Column("lease_owner", String(64), nullable=True),
    Column("lease_until", UTCDateTime, nullable=True),
    Index("ix_work_due", "due_at"),
    Index("ix_work_lease", "lease_until", "due_at"),
    Index("ix_work_node_attempt", "node_id", "attempt"),
    # Attempts queued for a slot of a step with max_concurrency, in due order.
    Index("ix_work_queued", "due_at", postgresql_where=text("kind = 'queued'"), sqlite_where=text("kind = 'queued'")),
    # A run's end notification still being delivered, by the run (retention keeps the run until it is done).
    Index("ix_work_notify", "root_id", postgresql_where=text("kind = 'notify'"), sqlite_where=text("kind = 'notify'")),
)

# PostgreSQL: the slots of each step with max_concurrency, one row a slot, made the first time a step needs
# them (slots 0 to its limit - 1; a raised limit adds rows, a lowered one leaves the top rows unused). An attempt
# takes a free row in a statement of its own that skips rows other transactions hold, so takers of one step
# never wait on each other; the event that ends the attempt frees the row, or hands it to the attempt that
# waited longest, in its own write. SQLite, whose writes are one at a time, counts holders in run_nodes instead.
step_slots = Table(
    "step_slots", metadata,
    Column("step_id", ID, primary_key=True),
    Column("slot", Integer, primary_key=True),
    Column("holder_id", ID, nullable=True),  # the node whose attempt holds it
    Column("holder_attempt", Integer, nullable=True),
    Column("taken_at", UTCDateTime, nullable=True),
    Index("ix_step_slots_holder", "holder_id", postgresql_where=text("holder_id IS NOT NULL"),
          sqlite_where=text("holder_id IS NOT NULL")),
)

events = Table(
    "events", metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("root_id", ID, nullable=False),
    Column("node_id", ID, nullable=True),
    Column("at", UTCDateTime, nullable=False),
    Column("kind", String(32), nullable=False),
    Column("data", JSONText, nullable=False),
    Index("ix_events_root", "root_id", "id"),
)

settings = Table(
    "settings", metadata,
    Column("key", String(64), primary_key=True),
    Column("value", Text, nullable=False),
)

# Runs started by the clock. `next_run_at` is NULL while a schedule is paused; the processes' tickers look for
# due schedules through its index, and claim a due time by moving it on under the value they read.
schedules = Table(
    "schedules", metadata,
    Column("id", ID, primary_key=True),
    Column("name", String(200), nullable=False, unique=True),
    Column("step", String(200), nullable=False),
    Column("cron", String(200), nullable=False),
    Column("timezone", String(64), nullable=False),
    Column("enabled", Boolean, nullable=False),
    Column("input", JSONText, nullable=True),
    Column("notify", Text, nullable=True),
    Column("next_run_at", UTCDateTime, nullable=True),
    Column("created_at", UTCDateTime, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
    Index("ix_schedules_next_run", "next_run_at"),
)

# The due times a schedule's ticker claimed, newest kept: a row without run_id or error is a claim whose run is
# still to be started (its process may have died), which any process starts under the same idempotency key.
schedule_runs = Table(
    "schedule_runs", metadata,
    Column("schedule_id", ID, primary_key=True),
    Column("due_at", UTCDateTime, primary_key=True),
    Column("claimed_at", UTCDateTime, nullable=False),
    Column("run_id", ID, nullable=True),
    Column("error", Text, nullable=True),
    Index("ix_schedule_runs_pending", "claimed_at", postgresql_where=text("run_id IS NULL AND error IS NULL"),
          sqlite_where=text("run_id IS NULL AND error IS NULL")),
)
