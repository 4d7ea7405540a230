"""SQLite: the embedded default. Events run whole in one writer thread, many to a transaction (group commit)."""

from __future__ import annotations

import asyncio
import queue
import sqlite3
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from sqlalchemy import event
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from aetr.domain.decide import RunScript
from aetr.store.sql import Duplicate, Exec, ExecMany, Fetch, Program, Statements, Unavailable, lower
from aetr.store.store import AfterCommit, ScriptCall, Store, _round_trips

BUSY_TIMEOUT_MS = 30_000  # milliseconds another process may hold the write lock before we give up
MAX_GROUP = 256  # events committed together at most: bounds how long one COMMIT keeps the others waiting
PRAGMAS = ("PRAGMA journal_mode=WAL", "PRAGMA synchronous=NORMAL", "PRAGMA foreign_keys=ON",
           f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")


class _Job:
    __slots__ = ("after_commit", "error", "future", "program", "result", "scripts", "seen")

    def __init__(self, program: Program, scripts: ScriptCall | None, after_commit: AfterCommit | None,
                 future: asyncio.Future[Any]) -> None:
        self.program = program
        self.scripts = scripts
        self.after_commit = after_commit
        self.future = future
        self.seen = _round_trips.get()  # the caller's statement log, when a test is counting
        self.result: Any = None
        self.error: BaseException | None = None


class Writer:
    """One thread that owns the writing connection and runs whole events on it.

    An event costs one hop to this thread and back instead of one per statement, and the events that queue
    up while one commits are committed together, each inside its own SAVEPOINT so that one failing event
    (a lost race, a bug) is rolled back alone.
    """

    def __init__(self, path: str, statements: Statements, loop: asyncio.AbstractEventLoop) -> None:
        self.path = path
        self.st = statements
        self.loop = loop
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._main, name="aetr-sqlite-writer", daemon=True)
        self._thread.start()

    def submit(self, program: Program, scripts: ScriptCall | None,
               after_commit: AfterCommit | None) -> asyncio.Future[Any]:
        """Queue an event; the future resolves once its transaction committed (or failed)."""
        future: asyncio.Future[Any] = self.loop.create_future()
        self._jobs.put(_Job(program, scripts, after_commit, future))
        return future

    def close(self) -> None:
        """Finish the queued events, then stop the thread."""
        self._jobs.put(None)
        self._thread.join(timeout=30)

    def _main(self) -> None:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        for pragma in PRAGMAS:
            conn.execute(pragma)
        try:
            while True:
                job = self._jobs.get()
                if job is None:
                    return
                group = [job]
                stop = False
                while len(group) < MAX_GROUP:
                    try:
                        more = self._jobs.get_nowait()
                    except queue.Empty:
                        break
                    if more is None:
                        stop = True
                        break
                    group.append(more)
                self._commit(conn, group)
                self.loop.call_soon_threadsafe(_deliver, group)
                if stop:
                    return
        finally:
            conn.close()

    def _commit(self, conn: sqlite3.Connection, group: list[_Job]) -> None:
        cur = conn.cursor()
        try:
            cur.execute("BEGIN IMMEDIATE")
            for job in group:
                cur.execute("SAVEPOINT event")
                try:
                    job.result = self._drive(cur, job)
                except Exception as exc:
                    job.error = exc
                    cur.execute("ROLLBACK TO event")
                cur.execute("RELEASE event")
            cur.execute("COMMIT")
        except Exception as exc:  # BEGIN or COMMIT failed (the disk, another process's lock): nothing stuck
            if conn.in_transaction:
                conn.rollback()
            failure = Unavailable(f"SQLite: {exc}") if isinstance(exc, sqlite3.OperationalError) else exc
            for job in group:
                job.error = job.error or failure

    def _drive(self, cur: sqlite3.Cursor, job: _Job) -> Any:
        ops = lower(job.program, self.st)
        answer: Any = None
        while True:
            try:
                op = ops.send(answer)
            except StopIteration as stop:
                return stop.value
            if isinstance(op, RunScript):
                assert job.scripts is not None, "this event runs no scripts"
                # The sandbox lives on the event loop: wait for it here, holding the transaction (a mapper's
                # result decides what is written).
                answer = asyncio.run_coroutine_threadsafe(job.scripts(op), self.loop).result()
                continue
            if job.seen is not None:
                job.seen.append(op.sql.text)
            try:
                if isinstance(op, Fetch):
                    answer = cur.execute(op.sql.text, op.sql.args(op.values)).fetchall()
                elif isinstance(op, Exec):
                    answer = cur.execute(op.sql.text, op.sql.args(op.values)).rowcount
                else:
                    assert isinstance(op, ExecMany)
                    cur.executemany(op.sql.text, [op.sql.args(v) for v in op.values])
                    answer = None
            except sqlite3.IntegrityError as exc:
                if "UNIQUE" in str(exc):
                    raise Duplicate(str(exc)) from exc
                raise
            except sqlite3.OperationalError as exc:  # locked past the busy timeout, disk I/O, read-only file
                raise Unavailable(f"SQLite: {exc}") from exc


def _deliver(group: list[_Job]) -> None:
    for job in group:
        if job.error is None and job.after_commit is not None:
            try:
                job.after_commit(job.result)
            except Exception as exc:  # a hook's bug must not keep the other events' callers waiting
                job.error = exc
        if job.future.done():  # the caller went away; the event is committed all the same
            continue
        if job.error is not None:
            job.future.set_exception(job.error)
        else:
            job.future.set_result(job.result)


class SqliteStore(Store):
    """Store on a SQLite file: events in the writer thread; other writes through SQLAlchemy, IMMEDIATE."""

    dialect = "sqlite"

    def __init__(self, engine: AsyncEngine) -> None:
        super().__init__(engine, Statements("sqlite"))
        self._write_lock = asyncio.Lock()
        self._writer: Writer | None = None
        path = engine.url.database
        if not path or path == ":memory:":
            raise ValueError("AETR keeps its state in a SQLite file: give a path, sqlite:///path/to/aetr.db")
        self.path = path

        @event.listens_for(engine.sync_engine, "connect")
        def on_connect(dbapi_conn: Any, _record: Any) -> None:
            # Take transaction control from the driver so that we choose BEGIN IMMEDIATE for writers.
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            for pragma in PRAGMAS:
                cur.execute(pragma)
            cur.close()

        @event.listens_for(engine.sync_engine, "begin")
        def on_begin(conn: Any) -> None:
            # Readers run in autocommit (each statement sees a consistent WAL snapshot); writers take
            # the write lock up front, so two writers never deadlock upgrading a read lock.
            if conn.get_execution_options().get("aetr_write"):
                conn.exec_driver_sql("BEGIN IMMEDIATE")

    async def run(self, program: Program, scripts: ScriptCall | None = None,
                  after_commit: Callable[[Any], None] | None = None) -> Any:
        if self._writer is None:
            self._writer = Writer(self.path, self.statements, asyncio.get_running_loop())
        return await self._writer.submit(program, scripts, after_commit)

    async def close(self) -> None:
        if self._writer is not None:
            writer, self._writer = self._writer, None
            await asyncio.to_thread(writer.close)
        await super().close()

    @asynccontextmanager
    async def _write_connection(self) -> AsyncIterator[AsyncConnection]:
        async with self._write_lock, self.engine.connect() as conn:
            conn = await conn.execution_options(aetr_write=True)
            async with conn.begin():
                yield conn

    def _insert_ignore(self, table: Any, values: dict[str, Any]) -> Any:
        return sqlite_insert(table).values(**values).on_conflict_do_nothing()
