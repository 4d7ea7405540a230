"""SQLite: the embedded default. Events run whole in one writer task, many to a transaction (group commit)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import struct
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any

from sqlalchemy import event
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from aetr.domain.decide import RunScript, ScriptResult
from aetr.store.errors import Duplicate, NeedsScripts, Unavailable
from aetr.store.lowering import lower
from aetr.store.operations import Exec, Fetch, Op
from aetr.store.requests import Program
from aetr.store.retention import SqliteRetentionStore
from aetr.store.sqlite_sql import SqliteStatements, indexed_by
from aetr.store.statements import Statements
from aetr.store.store import AfterCommit, ScriptAnswers, Store, _round_trips
from aetr.store.views import view_of_row

BUSY_TIMEOUT_MS = 30_000  # milliseconds another process may hold the write lock before we give up
BUSY_POLL_S = 0.002  # seconds between attempts to take the write lock while another connection holds it
MAX_GROUP = 256  # events committed together at most: bounds how long one COMMIT keeps the others waiting
# Run starts committed together at most, after the other events queued (up to MAX_GROUP of them): a start inserts
# a whole run, and a group of many keeps the loop (and a callback queued behind it) waiting that long.
MAX_STARTS_IN_GROUP = 16
# temp_store=MEMORY: each event runs in a SAVEPOINT, and SQLite keeps the pages a savepoint may have to restore
# in a statement journal, a temporary file by default: 40 pwrite() calls per event here, 87 % of all the
# writer's system calls, for a journal that is thrown away at every RELEASE.
PRAGMAS = ("PRAGMA journal_mode=WAL", "PRAGMA foreign_keys=ON", f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}",
           "PRAGMA temp_store=MEMORY")
# FULL: a commit is on the disk (one fsync of the WAL per group commit) before any caller hears of it, so a
# callback answered {"accepted": true} survives a power loss. NORMAL survives a killed process but may lose
# the last commits when the machine itself goes down; it is faster only where fsync is slow.
SYNCHRONOUS = ("full", "normal")
DEFAULT_SYNCHRONOUS = "full"
# Groups of at least this many events COMMIT on a thread of the writer's own (synchronous=FULL only). The COMMIT
# waits for the disk (an fsync of the WAL, and now and then a checkpoint's): there, the loop goes on reading
# callbacks and making calls rather than stopping for the disk. A group this big means events queue, so the
# thread's hand-over (about 0.1 ms more per commit) is paid where the loop has other work; a lone event (a
# chain's next step) commits on the loop's thread as before. Measured in docs/performance.md.
COMMIT_OFF_LOOP_FROM = 16
# The WAL is copied back into the database file (a checkpoint) once this many pages are in it and not yet copied:
# SQLite's own wal_autocheckpoint. The writer's checkpoints run beside its commits, not inside one: _Checkpoints.
CHECKPOINT_FRAMES = 1000
# A WAL this long (pages since it last started over) is copied back with the writes held, and starts over.
WAL_RESTART_FRAMES = 2 * CHECKPOINT_FRAMES
TREES_KEPT = 1024  # step trees' rows the writer keeps at most (a start of a step reads its tree's rows)


class _Guess:
    """Stands in for the value of a script not run yet, while the writer looks for the event's other scripts."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "<the value of a script not run yet>"


GUESS = _Guess()
GUESSED = ScriptResult(value=GUESS)


class _Chore:
    __slots__ = ("fn", "future")

    def __init__(self, fn: Callable[[sqlite3.Cursor], Any], future: asyncio.Future[Any]) -> None:
        self.fn = fn
        self.future = future


class _Job:
    __slots__ = ("after_commit", "error", "future", "program", "result", "scripts", "seen")

    def __init__(self, program: Program, scripts: ScriptAnswers | None, after_commit: AfterCommit | None,
                 future: asyncio.Future[Any]) -> None:
        self.program = program
        self.scripts = scripts
        self.after_commit = after_commit
        self.future = future
        self.seen = _round_trips.get()  # the caller's statement log, when a test is counting
        self.result: Any = None
        self.error: BaseException | None = None


class Writer:
    """One task on the event loop that owns the writing connection and runs whole events on it.

    The statements run synchronously on the loop's thread: each takes tens of microseconds on SQLite, less
    than handing it to a thread and back, and a thread of its own waited for the GIL after every statement
    (sqlite3 releases it around each step) whenever the loop was busy — ten times the statement's cost under
    load. Only a big group's COMMIT, which waits for the disk, goes to a thread (COMMIT_OFF_LOOP_FROM).

    The events that queue up while one group commits are committed together, each inside its own SAVEPOINT so
    that one failing event (a lost race, a bug) is rolled back alone. The connection never waits for the file
    lock inside the driver (that would stop the loop): a busy database is retried from here.

    No script runs here: a mapper that loops until its time limit would hold every other event's write for
    that long. An event whose program asks for a script not answered yet is rolled back and fails with
    NeedsScripts, naming every script it asked for (see `_run_job`); its caller runs them outside and submits
    the event again, and the program then finds their answers in its ScriptAnswers.
    """

    def __init__(self, path: str, statements: Statements, pragmas: tuple[str, ...],
                 commit_off_loop: bool = False) -> None:
        self.st = statements
        self.conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        for pragma in pragmas:
            self.conn.execute(pragma)
        self.conn.execute("PRAGMA busy_timeout=0")
        self._checkpoints = _Checkpoints.open(path, pragmas, self.conn)
        # Only this task uses the connection, and it waits while the thread commits: never two threads at once.
        self._committer = ThreadPoolExecutor(1, thread_name_prefix="aetr-sqlite-commit") if commit_off_loop else None
        self._jobs: list[_Job] = []  # every event but starts, first come first served
        self._starts: list[_Job] = []  # run starts: each group takes them after the others
        self._chores: list[_Chore] = []  # housekeeping, one transaction each, after a group
        self._ready = asyncio.Event()
        self._closing = False
        # The rows of the step trees starts read, by the key asked for, while no other connection has committed:
        # steps change only through other connections (the API's), and SQLite's data_version moves with each of
        # their commits, so a tree read once is read again only after something else was written.
        self._trees: dict[str, Any] = {}
        self._trees_as_of: int | None = None
        self._task = asyncio.create_task(self._main(), name="aetr-sqlite-writer")

    def submit(self, program: Program, scripts: ScriptAnswers | None,
               after_commit: AfterCommit | None, start: bool = False) -> asyncio.Future[Any]:
        """Queue an event (a run's start behind the others); the future resolves once its transaction committed
        (or failed)."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        (self._starts if start else self._jobs).append(_Job(program, scripts, after_commit, future))
        self._ready.set()
        return future

    def chore(self, fn: Callable[[sqlite3.Cursor], Any]) -> asyncio.Future[Any]:
        """Queue `fn(cursor)` to run in a transaction of its own after the group of events under way (deleting
        old runs); the future resolves to what it returned once committed. It runs on the loop's thread and
        holds every event back while it does: keep it to a few milliseconds."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._chores.append(_Chore(fn, future))
        self._ready.set()
        return future

    async def close(self) -> None:
        """Finish the queued events, then close the connection."""
        self._closing = True
        self._ready.set()
        await self._task
        if self._committer is not None:
            self._committer.shutdown()
        if self._checkpoints is not None:
            self._checkpoints.close()
        self.conn.close()

    async def _main(self) -> None:
        while True:
            await self._ready.wait()
            self._ready.clear()
            while self._jobs or self._starts or self._chores:
                group, self._jobs = self._jobs[:MAX_GROUP], self._jobs[MAX_GROUP:]
                # A few starts in every group, however many other events wait: starts wait, but never forever.
                group, self._starts = group + self._starts[:MAX_STARTS_IN_GROUP], self._starts[MAX_STARTS_IN_GROUP:]
                if group:
                    await self._commit(group)
                    _deliver(group)
                    if self._checkpoints is not None:
                        await self._checkpoints.after_group(queued=len(group) >= COMMIT_OFF_LOOP_FROM)
                if self._chores:  # one after each group: the events queued meanwhile go next
                    await self._run_chore(self._chores.pop(0))
            if self._closing:
                return

    async def _begin(self) -> None:
        waited = 0.0
        while True:
            try:
                self.conn.execute("BEGIN IMMEDIATE")
                return
            except sqlite3.OperationalError as exc:
                if ("locked" not in str(exc) and "busy" not in str(exc)) or waited >= BUSY_TIMEOUT_MS / 1000:
                    raise
            await asyncio.sleep(BUSY_POLL_S)  # another connection writes: let it finish, on this loop too
            waited += BUSY_POLL_S

    async def _commit(self, group: list[_Job]) -> None:
        cur = self.conn.cursor()
        try:
            await self._begin()
            self._forget_trees_if_changed(cur)
            for job in group:
                cur.execute("SAVEPOINT event")
                try:
                    job.result = self._run_job(job, cur)
                except Exception as exc:
                    job.error = exc
                    cur.execute("ROLLBACK TO event")
                cur.execute("RELEASE event")
            if self._committer is not None and len(group) >= COMMIT_OFF_LOOP_FROM:
                await asyncio.get_running_loop().run_in_executor(self._committer, cur.execute, "COMMIT")
            else:
                cur.execute("COMMIT")
        except Exception as exc:  # BEGIN or COMMIT failed (the disk, another process's lock): nothing stuck
            if self.conn.in_transaction:
                self.conn.rollback()
            failure = Unavailable(f"SQLite: {exc}") if isinstance(exc, sqlite3.OperationalError) else exc
            for job in group:
                job.error = job.error or failure

    def _forget_trees_if_changed(self, cur: sqlite3.Cursor) -> None:
        """In the group's transaction (no other connection can commit until it ends): forget the trees read
        when another connection has committed since they were."""
        ((version,),) = cur.execute("PRAGMA data_version").fetchall()
        if version != self._trees_as_of:
            self._trees.clear()
            self._trees_as_of = version

    def _fetch_tree(self, cur: sqlite3.Cursor, op: Fetch, seen: list[str] | None) -> Any:
        """A step tree's rows, read only when not kept since the last commit of another connection."""
        key = op.values["key"]
        rows = self._trees.get(key)
        if rows is None:
            if seen is not None:
                seen.append(op.sql.text)
            rows = _execute(cur, op)
            if len(self._trees) >= TREES_KEPT:
                self._trees.clear()
            self._trees[key] = rows
        return rows

    async def _run_chore(self, chore: _Chore) -> None:
        cur = self.conn.cursor()
        try:
            await self._begin()
            result = chore.fn(cur)
            cur.execute("COMMIT")
        except Exception as exc:
            if self.conn.in_transaction:
                self.conn.rollback()
            if not chore.future.done():
                chore.future.set_exception(Unavailable(f"SQLite: {exc}") if isinstance(exc, sqlite3.OperationalError)
                                           else exc)
        else:
            if not chore.future.done():
                chore.future.set_result(result)

    def _run_job(self, job: _Job, cur: sqlite3.Cursor) -> Any:
        """Run a job's program to its end and return its result, or raise NeedsScripts.

        A script whose answer is not known yet is answered with a stand-in value and the program goes on, so
        that one pass finds every script the event needs (a parallel parent's mappers, say) rather than one
        per pass. Scripts whose arguments hold a stand-in are not collected: their real arguments are known
        only once the scripts before them have run, in a later pass. Whatever the stand-ins lead to is rolled
        back, and so is an error they may have caused.
        """
        ops = lower(job.program, self.st)
        missing: list[RunScript] = []
        answer: Any = None
        try:
            while True:
                try:
                    op = ops.send(answer)
                except StopIteration as stop:
                    if missing:
                        raise NeedsScripts(missing) from None
                    return stop.value
                if isinstance(op, RunScript):
                    assert job.scripts is not None, "this event runs no scripts"
                    if missing and _holds_guess(op.args):
                        answer = GUESSED
                    else:
                        answer = job.scripts.known(op)
                        if answer is None:
                            missing.append(op)
                            answer = GUESSED
                else:
                    if isinstance(op, Fetch) and op.sql is self.st.load_tree:
                        answer = self._fetch_tree(cur, op, job.seen)
                    else:
                        if job.seen is not None:
                            job.seen.append(op.sql.text)
                        answer = _execute(cur, op)
        except NeedsScripts:
            raise
        except Exception as exc:
            if missing:
                raise NeedsScripts(missing) from exc
            raise
        finally:
            ops.close()


class _Checkpoints:
    """The writer's checkpoints, beside its commits rather than inside one.

    SQLite's autocheckpoint runs in the COMMIT that takes the WAL past CHECKPOINT_FRAMES pages: that commit, and
    the events behind it, wait while the pages are copied into the database file and the file is synced (1-3 ms
    here, longer as the file grows). Here the writer's connection does not checkpoint. After a group's callers
    have been answered, a connection of this class's own copies the pages back (PASSIVE, as the autocheckpoint)
    on a thread while the writer goes on committing. SQLite starts the WAL over only at a write that finds every
    page of it copied back, which the writes beside such a checkpoint prevent; so once the WAL has
    WAL_RESTART_FRAMES pages, the checkpoint is a RESTART, which holds other writers off while it copies so
    that the next write starts the WAL over, and the writer waits for it. So does the writer after a group big
    enough to mean that events are queueing, where a copy beside its commits would compete with them for the
    disk.

    How far the WAL has got is read from the wal-index (the `-shm` file every connection to a WAL database maps):
    the header's mxFrame (offset 16) and the checkpoint's nBackfill (offset 96), 32-bit in the machine's byte
    order, as sqlite.org/walformat.html lays them out. Where there is no such file to read, or its header
    is of another version than that layout's, `open` answers None and SQLite's autocheckpoint stays.
    """

    RETRY_FRAMES = CHECKPOINT_FRAMES // 4  # pages written before a checkpoint that did not finish is tried again

    def __init__(self, shm: int, path: str, pragmas: tuple[str, ...]) -> None:
        self._shm = shm
        self._conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        for pragma in pragmas:
            self._conn.execute(pragma)
        # Never wait: with a reader in the way (a backup, say) a RESTART copies what it can, as PASSIVE does, and
        # is tried again RETRY_FRAMES later. Waiting for the reader would hold the writer up at every try.
        self._conn.execute("PRAGMA busy_timeout=0")
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="aetr-sqlite-checkpoint")
        self._beside: asyncio.Future[None] | None = None
        self._tried_at = 0  # mxFrame when a checkpoint was last started

    @classmethod
    def open(cls, path: str, pragmas: tuple[str, ...], writer: sqlite3.Connection) -> _Checkpoints | None:
        """Take the checkpoints over from `writer`'s autocheckpoint, or None where the WAL's index is not a file."""
        writer.execute("SELECT 1 FROM sqlite_master LIMIT 1").fetchall()  # a transaction makes the -shm file
        try:
            shm = os.open(path + "-shm", os.O_RDONLY)
        except OSError:
            return None
        header = os.pread(shm, 4, 0)
        if len(header) < 4 or _U32.unpack(header)[0] != WAL_INDEX_VERSION:  # a layout this code does not know
            os.close(shm)
            return None
        writer.execute("PRAGMA wal_autocheckpoint=0")
        return cls(shm, path, pragmas)

    def frames(self) -> tuple[int, int]:
        """(pages in the WAL not copied back yet, pages in the WAL since it last started over)."""
        header = os.pread(self._shm, 100, 0)
        if len(header) < 100:
            return 0, 0
        (mx_frame,) = _U32.unpack_from(header, 16)
        (backfilled,) = _U32.unpack_from(header, 96)
        return mx_frame - backfilled, mx_frame

    async def after_group(self, queued: bool) -> None:
        """Checkpoint if it is time; `queued`: the group was a big one, and the writer waits for a RESTART."""
        behind, frames = self.frames()
        if frames < self._tried_at:  # the WAL started over
            self._tried_at = 0
        if behind < CHECKPOINT_FRAMES or frames < self._tried_at + self.RETRY_FRAMES:
            return
        self._tried_at = frames
        loop = asyncio.get_running_loop()
        if queued or frames >= WAL_RESTART_FRAMES:
            await loop.run_in_executor(self._thread, self._checkpoint, "RESTART")  # after the one beside, if any
        elif self._beside is None or self._beside.done():
            self._beside = loop.run_in_executor(self._thread, self._checkpoint, "PASSIVE")

    def _checkpoint(self, mode: str) -> None:
        with contextlib.suppress(sqlite3.Error):  # the disk, say: tried again after a later group
            self._conn.execute(f"PRAGMA wal_checkpoint({mode})").fetchall()

    def close(self) -> None:
        self._thread.shutdown()
        self._conn.close()
        os.close(self._shm)


_U32 = struct.Struct("=I")
WAL_INDEX_VERSION = 3007000  # the wal-index header's first field, the layout's version (since SQLite 3.7.0)


def _execute(cur: sqlite3.Cursor, op: Op) -> Any:
    """Run one statement; a statement takes tens of microseconds, so the loop's thread runs it."""
    try:
        if isinstance(op, Fetch):
            return cur.execute(op.sql.text, op.sql.args(op.values)).fetchall()
        if isinstance(op, Exec):
            return cur.execute(op.sql.text, op.sql.args(op.values)).rowcount
        cur.executemany(op.sql.text, [op.sql.args(v) for v in op.values])
        return None
    except sqlite3.IntegrityError as exc:
        if "UNIQUE" in str(exc):
            raise Duplicate(str(exc)) from exc
        raise
    except sqlite3.OperationalError as exc:  # disk I/O, a read-only file
        raise Unavailable(f"SQLite: {exc}") from exc


def _holds_guess(value: Any) -> bool:
    """Whether a stand-in for a script's value is anywhere inside `value`."""
    stack = [value]
    while stack:
        v = stack.pop()
        if v is GUESS:
            return True
        if isinstance(v, dict):
            stack.extend(v.values())
        elif isinstance(v, list | tuple):
            stack.extend(v)
    return False


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

    def __init__(self, engine: AsyncEngine, synchronous: str = DEFAULT_SYNCHRONOUS) -> None:
        super().__init__(engine, SqliteStatements())
        if synchronous not in SYNCHRONOUS:
            raise ValueError(f"SQLite synchronous={synchronous!r}: use one of {', '.join(SYNCHRONOUS)}")
        self.pragmas = (*PRAGMAS, f"PRAGMA synchronous={synchronous.upper()}")
        self._commit_off_loop = synchronous == "full"  # NORMAL does not wait for the disk at a commit
        pragmas = self.pragmas
        self._write_lock = asyncio.Lock()
        self._writer: Writer | None = None
        self._readers = threading.local()  # each reading thread's own connection
        self._reader_conns: list[sqlite3.Connection] = []
        path = engine.url.database
        if not path or path == ":memory:":
            raise ValueError("AETR keeps its state in a SQLite file: give a path, sqlite:///path/to/aetr.db")
        self.path = path
        self.retention = SqliteRetentionStore(engine, self._transaction,
                                              lambda fn: self._the_writer().chore(fn))

        @event.listens_for(engine.sync_engine, "connect")
        def on_connect(dbapi_conn: Any, _record: Any) -> None:
            # Take transaction control from the driver so that we choose BEGIN IMMEDIATE for writers.
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            for pragma in pragmas:
                cur.execute(pragma)
            cur.close()

        @event.listens_for(engine.sync_engine, "before_cursor_execute", retval=True)
        def tell_index(_conn: Any, _cursor: Any, statement: str, parameters: Any, context: Any,
                       _many: bool) -> tuple[str, Any]:
            # A statement's `aetr_indexed_by` option names the index SQLite must read its run_nodes through.
            # Without statistics SQLite takes `parent_id IS NULL` (the roots: a listing's, retention's) to an
            # equality on ix_run_nodes_parent, reads every root through it and sorts them (0.1 s a page with
            # 50,000 runs, growing with them), where the index named gives the rows asked for first.
            index = context.execution_options.get("aetr_indexed_by") if context is not None else None
            if index:
                statement = indexed_by(statement, index)
            return statement, parameters

        @event.listens_for(engine.sync_engine, "begin")
        def on_begin(conn: Any) -> None:
            # Readers run in autocommit (each statement sees a consistent WAL snapshot); writers take
            # the write lock up front, so two writers never deadlock upgrading a read lock.
            if conn.get_execution_options().get("aetr_write"):
                conn.exec_driver_sql("BEGIN IMMEDIATE")

    async def run(self, program: Program, scripts: ScriptAnswers | None = None,
                  after_commit: Callable[[Any], None] | None = None, start: bool = False) -> Any:
        return await self._the_writer().submit(program, scripts, after_commit, start)

    def _the_writer(self) -> Writer:
        if self._writer is None:
            self._writer = Writer(self.path, self.statements, self.pragmas, self._commit_off_loop)
        return self._writer

    async def _fetch_view(self, text: str, args: tuple[Any, ...]) -> list[dict[str, Any]]:
        # In a thread, on a connection of that thread's own: a 10,000-node run is tens of milliseconds of
        # reading that the loop goes on without.
        return await asyncio.to_thread(self._read_rows, text, args, view_of_row)

    async def _fetch_rows(self, text: str, args: tuple[Any, ...]) -> list[Any]:
        return await asyncio.to_thread(self._read_rows, text, args, None)

    def _read_rows(self, text: str, args: tuple[Any, ...], convert: Callable[[Any], Any] | None) -> list[Any]:
        conn: sqlite3.Connection | None = getattr(self._readers, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            self._readers.conn = conn
            self._reader_conns.append(conn)
        try:
            rows = conn.execute(text, args).fetchall()
        except sqlite3.OperationalError as exc:
            raise Unavailable(f"SQLite: {exc}") from exc
        return rows if convert is None else [convert(r) for r in rows]

    async def close(self) -> None:
        for conn in self._reader_conns:
            conn.close()
        self._reader_conns.clear()
        if self._writer is not None:
            writer, self._writer = self._writer, None
            await writer.close()
        await super().close()

    @asynccontextmanager
    async def _write_connection(self) -> AsyncIterator[AsyncConnection]:
        async with self._write_lock, self.engine.connect() as conn:
            conn = await conn.execution_options(aetr_write=True)
            async with conn.begin():
                yield conn

    def _insert_ignore(self, table: Any, values: dict[str, Any]) -> Any:
        return sqlite_insert(table).values(**values).on_conflict_do_nothing()
