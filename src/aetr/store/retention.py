"""Retention's storage: deleting ended runs with every row that belongs to them, a batch per transaction."""

from __future__ import annotations

import functools
import sqlite3
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from datetime import datetime
from typing import Any, Literal, cast

from sqlalchemy import ColumnElement, Integer, Select, and_, bindparam, delete, select, text, update
from sqlalchemy.dialects import sqlite
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.sql.compiler import SQLCompiler

from aetr.store.sqlite_sql import indexed_by, sqlite_time
from aetr.store.tables import events, run_counters, run_nodes, step_slots, work

ENDED = ("complete", "error", "cancelled")  # the states a run (its root) ends in
RETENTION_LOCK = 0x4145_5452_5245_5445  # PostgreSQL advisory lock key held by the one process that deletes
Transaction = Callable[[], AbstractAsyncContextManager[AsyncConnection]]
Deleted = Literal["deleted", "running", "unknown"]
# Runs `fn(cursor)` in a write transaction of its own on SQLite's events writer, between two of its group commits.
Chore = Callable[[Callable[[sqlite3.Cursor], int]], Awaitable[int]]


class RetentionStore:
    """The retention part of the Store (cold paths, through SQLAlchemy Core)."""

    def __init__(self, engine: AsyncEngine, transaction: Transaction) -> None:
        self.engine = engine
        self._transaction = transaction
        self._lock_conn: AsyncConnection | None = None

    async def delete_run(self, run_id: str) -> Deleted:
        """Delete the ended run `run_id` (its root's id) and all its rows, its end notification too if still
        being delivered; "running" (nothing deleted) while it has not ended, "unknown" when there is no such run."""
        async with self._transaction() as conn:
            # FOR UPDATE (PostgreSQL): an event changing the run (a retry) waits for us, then finds no row and
            # is refused; one that committed first is seen here, its state checked again.
            row = (await conn.execute(
                select(run_nodes.c.state).where(run_nodes.c.id == run_id, run_nodes.c.parent_id.is_(None))
                .with_for_update())).first()
            if row is None:
                return "unknown"
            if row[0] not in ENDED:
                return "running"
            await _delete_roots(conn, [run_id])
            return "deleted"

    async def delete_ended(self, ended_before: datetime, limit: int) -> int:
        """Delete up to `limit` runs that ended before `ended_before` (the earliest first) with all their rows,
        in one transaction; how many. A run whose end notification is still being delivered is kept until the
        delivery is done or given up. On PostgreSQL runs another transaction is deleting are skipped."""
        async with self._transaction() as conn:
            roots = [str(r) for (r,) in await conn.execute(due_query(), {"ended_before": ended_before, "limit": limit})]
            if roots:
                await _delete_roots(conn, roots)
            return len(roots)

    async def hold_lock(self) -> bool:
        """Whether this process is (now) the one deleting by retention: on PostgreSQL it holds a session advisory
        lock on a connection of its own, kept from one call to the next; other databases need no lock."""
        if self.engine.dialect.name != "postgresql":
            return True
        if self._lock_conn is not None:
            try:
                await self._lock_conn.execute(text("SELECT 1"))
                await self._lock_conn.commit()
                return True
            except DBAPIError:  # the connection was lost, and the lock with it: take it again if free
                await self.release_lock()
        conn = await self.engine.connect()
        try:
            held = bool(await conn.scalar(text("SELECT pg_try_advisory_lock(:key)"), {"key": RETENTION_LOCK}))
            await conn.commit()  # not left idle in a transaction: a session lock outlives it
        except BaseException:
            await conn.invalidate()
            await conn.close()
            raise
        if held:
            self._lock_conn = conn
            return True
        await conn.close()
        return False

    async def release_lock(self) -> None:
        """Let another process delete: the lock's connection is closed, not returned to the pool holding it."""
        conn, self._lock_conn = self._lock_conn, None
        if conn is not None:
            try:
                await conn.invalidate()
            finally:
                await conn.close()


def due_query() -> Select[tuple[str]]:
    """The ids of up to `:limit` runs that ended before `:ended_before`, earliest first, whose end notification is
    not being delivered: a range of ix_run_nodes_ended, and one probe of ix_work_notify per run. PostgreSQL skips
    the runs another transaction is deleting; SQLite's planner, which has no statistics, would take the index of a
    node's children for `parent_id IS NULL` and sort every run (46 ms a batch with 20,000 runs kept), so it is
    told the index (the store's `aetr_indexed_by`)."""
    notifying = select(work.c.id).where(work.c.kind == "notify", work.c.root_id == run_nodes.c.id).exists()
    return (select(run_nodes.c.id)
            .where(run_nodes.c.parent_id.is_(None), run_nodes.c.completed_at.is_not(None),
                   run_nodes.c.completed_at < bindparam("ended_before"), run_nodes.c.state.in_(ENDED), ~notifying)
            .order_by(run_nodes.c.completed_at).limit(bindparam("limit", type_=Integer()))
            .with_for_update(of=run_nodes, skip_locked=True)
            .execution_options(aetr_indexed_by="ix_run_nodes_ended"))


def _deletes(of_runs: Callable[[Any], ColumnElement[bool]]) -> list[Any]:
    """The statements that delete every row of the runs `of_runs(column)` matches by their root's id: what refers
    to their nodes first, the nodes last. Nodes are found through ix_run_nodes_root and the rows that refer to
    them through their own indexes."""
    nodes = select(run_nodes.c.id).where(of_runs(run_nodes.c.root_id))
    return [
        delete(run_counters).where(run_counters.c.node_id.in_(nodes)),
        # An ended run holds no slot; were one left behind, it is freed rather than lost to its step.
        update(step_slots).where(step_slots.c.holder_id.in_(nodes))
        .values(holder_id=None, holder_attempt=None, taken_at=None),
        delete(work).where(work.c.node_id.in_(nodes)),
        delete(work).where(and_(work.c.kind == "notify", of_runs(work.c.root_id))),
        delete(events).where(of_runs(events.c.root_id)),
        delete(run_nodes).where(of_runs(run_nodes.c.root_id)),
    ]


async def _delete_roots(conn: AsyncConnection, roots: Sequence[str]) -> None:
    """Delete every row of the runs `roots`."""
    for statement in _deletes(lambda root_id: root_id.in_(roots)):
        await conn.execute(statement)


class SqliteRetentionStore(RetentionStore):
    """On SQLite, a batch of retention is deleted by the events' writer, between two of its group commits.

    Through SQLAlchemy, a batch's transaction held the file's write lock across a thread hop per statement, each
    waiting for a busy event loop, while the writer polled for the lock: running work's p99 doubled. On the
    writer, the batch runs at once, on the loop's thread, for as long as its statements take."""

    def __init__(self, engine: AsyncEngine, transaction: Transaction, chore: Chore) -> None:
        super().__init__(engine, transaction)
        self._chore = chore

    async def delete_ended(self, ended_before: datetime, limit: int) -> int:
        return await self._chore(functools.partial(_delete_ended_on, ended_before=sqlite_time(ended_before),
                                                   limit=limit))


@functools.cache
def _sqlite_retention() -> tuple[SQLCompiler, str, list[SQLCompiler]]:
    """The due query (its text told its index, as SqliteStore tells it) and the deletes, compiled for SQLite's
    driver once; the deletes match one run each (`:root`), run with executemany."""
    dialect = sqlite.dialect(paramstyle="named")
    due = due_query().compile(dialect=dialect)
    return due, due_query().get_execution_options()["aetr_indexed_by"], [
        cast(SQLCompiler, statement.compile(dialect=dialect))
        for statement in _deletes(lambda root_id: root_id == bindparam("root"))]


def _delete_ended_on(cur: sqlite3.Cursor, ended_before: str, limit: int) -> int:
    """`delete_ended` on the SQLite writer's cursor, inside its transaction."""
    due, index, deletes = _sqlite_retention()
    query = due.construct_expanded_state({"ended_before": ended_before, "limit": limit})
    roots = [r for (r,) in cur.execute(indexed_by(query.statement, index), query.parameters).fetchall()]
    for statement in deletes:
        cur.executemany(statement.string, [dict(statement.construct_params({"root": root}) or {}) for root in roots])
    return len(roots)
