"""The Store: the only code that talks SQL.

Events (`run`) go through the prebuilt statements of aetr.store.statements on each backend's fastest path; step
trees, listings and the other colder reads and writes go through SQLAlchemy Core here.
"""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from sqlalchemy import QueuePool, Select, delete, event, select, text, tuple_, update
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from aetr.domain.decide import RunScript, ScriptResult
from aetr.domain.ids import prefix_bounds
from aetr.domain.runs import Node
from aetr.domain.steps import DEFAULT_MAX_TREE_NODES, StepDef, StepTree
from aetr.store import codec, step_trees
from aetr.store.errors import Conflict, Duplicate, StepsRefused
from aetr.store.operations import Op, OpStream, Sql
from aetr.store.requests import Program
from aetr.store.retention import RetentionStore
from aetr.store.schedules import ScheduleStore
from aetr.store.statements import Statements
from aetr.store.step_trees import StepsApplied
from aetr.store.tables import events, run_nodes, settings, step_children, steps, work
from aetr.store.views import nest, nest_json

ScriptCall = Callable[[RunScript], Coroutine[Any, Any, ScriptResult]]  # how an event's program reaches the sandbox


class ScriptAnswers:
    """How an event's program reaches the sandbox, and the answers it got, kept across the runs of the event.

    Scripts are pure functions of their source and arguments, so an answer serves every later run of the event
    that asks the same: a store that must not wait for the sandbox inside a transaction (SQLite's single
    writer) raises NeedsScripts instead, and the event runs again once they are answered here.
    """

    def __init__(self, call: ScriptCall) -> None:
        self._call = call
        self._known: dict[tuple[str, str], ScriptResult] = {}

    def known(self, req: RunScript) -> ScriptResult | None:
        """The answer to `req`, if a script with that source was already run on those arguments."""
        return self._known.get(_script_key(req))

    async def __call__(self, req: RunScript) -> ScriptResult:
        """Run `req` in the sandbox (unless it is known) and keep its answer."""
        key = _script_key(req)
        answer = self._known.get(key)
        if answer is None:
            answer = self._known[key] = await self._call(req)
        return answer

    async def run_all(self, requests: Sequence[RunScript]) -> None:
        """Run every request not yet known, side by side (the sandbox has a pool of workers)."""
        unknown = {_script_key(r): r for r in requests if self.known(r) is None}
        await asyncio.gather(*(self(r) for r in unknown.values()))


def _script_key(req: RunScript) -> tuple[str, str]:
    """A script request's source and arguments, as a dict key."""
    try:
        args = orjson.dumps(req.args).decode()
    except TypeError:  # integers beyond 64 bits, nesting beyond 254 levels: json takes them
        args = json.dumps(req.args, separators=(",", ":"))
    return req.source, args
AfterCommit = Callable[[Any], None]  # told an event's result once it is committed, whoever still awaits it

STEP_CHANGES_LOCK = 0x4145_5452_5354_4550  # PostgreSQL advisory lock key serialising step-tree changes
RETRYABLE_SQLSTATES = frozenset({"40P01", "40001"})  # deadlock detected, serialization failure


def sqlstate(exc: DBAPIError) -> str | None:
    """The SQLSTATE of a driver error, when the driver reports one (asyncpg does)."""
    for err in (exc.orig, getattr(exc.orig, "__cause__", None)):
        code = getattr(err, "sqlstate", None) or getattr(err, "pgcode", None)
        if isinstance(code, str):
            return code
    return None


@dataclass(frozen=True)
class RunPage:
    """One page of root runs, newest first, and the cursor of the next page."""

    runs: list[Node]
    next_cursor: str | None


_round_trips: ContextVar[list[str] | None] = ContextVar("aetr_round_trips", default=None)


@contextmanager
def count_round_trips() -> Iterator[list[str]]:
    """Collect the SQL statements this task sends while the block runs (tests assert on their number)."""
    seen: list[str] = []
    token = _round_trips.set(seen)
    try:
        yield seen
    finally:
        _round_trips.reset(token)


class Store:
    """Steps, runs, work and history in one database."""

    dialect = "generic"

    def __init__(self, engine: AsyncEngine, statements: Statements) -> None:
        self.engine = engine
        self.statements = statements
        # Events of running work this process has run (callbacks, starts, claims of due work; not an empty poll):
        # while it grows, deleting old runs slows down. The engine counts them (`ran_work`).
        self.work_events = 0
        self.schedules = ScheduleStore(engine, self._transaction)
        self.retention = RetentionStore(engine, self._transaction)

        def record(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
            seen = _round_trips.get()
            if seen is not None:
                seen.append(statement)

        event.listen(engine.sync_engine, "before_cursor_execute", record)

    def ran_work(self) -> None:
        """Count an event of running work (see `work_events`)."""
        self.work_events += 1

    async def close(self) -> None:
        """Release every connection."""
        await self.retention.release_lock()
        await self.engine.dispose()

    # ---- hooks the backends override -------------------------------------------------------------

    @asynccontextmanager
    async def _write_connection(self) -> AsyncIterator[AsyncConnection]:
        async with self.engine.begin() as conn:
            yield conn

    def _insert_ignore(self, table: Any, values: dict[str, Any]) -> Any:
        raise NotImplementedError

    # ---- events -------------------------------------------------------------------------------------

    async def run(self, program: Program, scripts: ScriptAnswers | None = None,
                  after_commit: AfterCommit | None = None, start: bool = False) -> Any:
        """Run an event's program in one transaction and return its result once committed.

        `start` marks a run's start: it waits behind the other events queued (callbacks, answers, deadlines),
        which are never kept waiting by a burst of starts.

        (PostgreSQL sends no BEGIN and COMMIT for a program whose only write is one statement atomic by
        itself: see postgres._LazyTransaction.)

        `after_commit` is told the result right after the commit, on the event loop, even when the caller was
        cancelled meanwhile. A lost optimistic-lock race raises Conflict (handle the event again); so does a
        deadlock or serialisation failure the database resolved by aborting us. A unique key taken by another
        transaction raises Duplicate. A store that runs no script while it holds the database (SQLite) raises
        NeedsScripts when the program asks for one that `scripts` does not know yet: answer them
        (`scripts.run_all`) and run the event again with a new program.
        """
        raise NotImplementedError

    async def get_run_view(self, node_id: str) -> list[dict[str, Any]]:
        """Every node of the run `node_id` belongs to, as the API shows it, in one query (empty when unknown).

        The read path of `GET /runs/{id}`: only the columns shown, on the raw driver, stored JSON passed through
        without being parsed and written again.
        """
        sql = self.statements.run_view
        seen = _round_trips.get()
        if seen is not None:
            seen.append(sql.text)
        return await self._fetch_view(sql.text, sql.args({"node_id": node_id}))

    async def get_run_json(self, node_id: str) -> bytes | None:
        """`GET /runs/{id}`'s answer for the run `node_id` belongs to, in one query (None when unknown).

        SQLite writes each node's JSON itself, only nested here (aetr.store.views.nest_json); other databases
        answer from get_run_view."""
        if self.statements.run_json is not None:
            rows = await self._read(self.statements.run_json, node_id)
            return nest_json(rows) if rows else None
        flat = await self.get_run_view(node_id)
        return orjson.dumps(nest(flat)) if flat else None

    async def get_run_state(self, node_id: str) -> tuple[str, str] | None:
        """(root id, state) of the run `node_id` belongs to, or None: what a `?wait=` looks at between reads."""
        rows = await self._read(self.statements.run_state, node_id)
        return (rows[0][0], rows[0][1]) if rows else None

    async def _read(self, sql: Sql, node_id: str) -> list[Sequence[Any]]:
        seen = _round_trips.get()
        if seen is not None:
            seen.append(sql.text)
        return await self._fetch_rows(sql.text, sql.args({"node_id": node_id}))

    async def _fetch_view(self, text: str, args: tuple[Any, ...]) -> list[dict[str, Any]]:
        raise NotImplementedError

    async def _fetch_rows(self, text: str, args: tuple[Any, ...]) -> list[Sequence[Any]]:
        raise NotImplementedError

    @staticmethod
    async def _drive(ops: OpStream, scripts: ScriptAnswers | None, seen: list[str] | None,
                     execute: Callable[[Op], Awaitable[Any]], pending: Op | RunScript | None = None,
                     answer: Any = None) -> Any:
        """Run a lowered program's operations in order (from `pending`, its next one, when given): statements
        through the backend's `execute`, scripts in the sandbox (the transaction, if one is open, waits for
        them: a mapper's result decides what is written; PostgreSQL opens one only at the first write)."""
        op = pending
        while True:
            if op is None:
                try:
                    op = ops.send(answer)
                except StopIteration as stop:
                    return stop.value
            if isinstance(op, RunScript):
                assert scripts is not None, "this event runs no scripts"
                answer = await scripts(op)
            else:
                if seen is not None:
                    seen.append(op.sql.text)
                answer = await execute(op)
            op = None

    @asynccontextmanager
    async def _transaction(self) -> AsyncIterator[AsyncConnection]:
        """A SQLAlchemy write transaction, for the colder writes (step trees, settings)."""
        try:
            async with self._write_connection() as conn:
                yield conn
        except DBAPIError as exc:
            if sqlstate(exc) in RETRYABLE_SQLSTATES:
                raise Conflict(f"the database aborted the transaction ({sqlstate(exc)})") from exc
            raise

    # ---- step trees ----------------------------------------------------------------------------------

    async def get_step_tree(self, key: str) -> StepTree | None:
        """The resolved tree of the step named (or with id) `key`, in one recursive query."""
        async with self.engine.connect() as conn:
            return await step_trees.load_tree(conn, key)

    async def list_steps(self) -> list[dict[str, Any]]:
        """Every step's summary, sorted by name."""
        async with self.engine.connect() as conn:
            rows = await conn.execute(select(steps.c.id, steps.c.name, steps.c.kind, steps.c.version,
                                             steps.c.updated_at).order_by(steps.c.name))
            return [_plain(r._mapping) for r in rows]

    async def step_parents(self, name: str) -> list[str] | None:
        """Names of the steps that have `name` as a child (None when there is no such step)."""
        async with self.engine.connect() as conn:
            step_id = await conn.scalar(select(steps.c.id).where(steps.c.name == name))
            if step_id is None:
                return None
            return await step_trees.parent_names(conn, step_id)

    async def put_steps(self, defs: Sequence[StepDef], if_match: int | None, now: datetime,
                        max_nodes: int = DEFAULT_MAX_TREE_NODES) -> tuple[bool, StepTree]:
        """Create or replace `defs[0]` and its inline children in one transaction; (created, resolved tree)."""
        applied = await self.apply_steps(defs, if_match, now, max_nodes)
        return applied.created, applied.tree

    async def apply_steps(self, defs: Sequence[StepDef], if_match: int | None, now: datetime,
                          max_nodes: int = DEFAULT_MAX_TREE_NODES, dry_run: bool = False) -> StepsApplied:
        """Create or replace `defs[0]` and its inline children in one transaction; a step defined as stored is
        left as it is (its version too). With `dry_run`, what it would do, with nothing kept.

        Refused, with nothing kept: StepsRefused, CycleError, and TreeTooBig when a stored tree containing a
        changed step would resolve to more than `max_nodes` nodes.
        """
        try:
            return await self._apply_steps(defs, if_match, now, max_nodes, dry_run)
        except _RolledBack as done:
            return done.applied

    async def _apply_steps(self, defs: Sequence[StepDef], if_match: int | None, now: datetime, max_nodes: int,
                           dry_run: bool) -> StepsApplied:
        async with self._transaction() as conn:
            if self.dialect == "postgresql":
                # One change of step trees at a time, across processes: the cycle, depth and size checks read the
                # stored trees, and two changes checked side by side (READ COMMITTED) could each pass while
                # together they make a cycle or pass a limit. SQLite has one writer already.
                await conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": STEP_CHANGES_LOCK})
                # The recursive queries' row estimates are far too high, so PostgreSQL would compile them (JIT):
                # 300-400 ms per query for a 100,000-child parallel, more than running them takes.
                await conn.execute(text("SET LOCAL jit = off"))
            applied = await step_trees.put_steps(conn, defs, if_match, now, max_nodes)
            if dry_run:
                raise _RolledBack(applied)  # leaving the block by an exception rolls the transaction back
            return applied

    async def delete_step(self, name: str) -> bool:
        """Delete a step no parent uses; False when there is none; StepsRefused(409) while one does."""
        async with self._transaction() as conn:
            step_id = await conn.scalar(select(steps.c.id).where(steps.c.name == name))
            if step_id is None:
                return False
            parents = await step_trees.parent_names(conn, step_id)
            if parents:
                raise StepsRefused(409, f"step '{name}' is used by {', '.join(sorted(parents))}; "
                                        "remove it from them first")
            await conn.execute(delete(step_children).where(step_children.c.parent_id == step_id))
            await conn.execute(delete(steps).where(steps.c.id == step_id))
            return True

    # ---- runs ----------------------------------------------------------------------------------------

    async def root_of(self, node_id: str) -> str | None:
        """The id of the run (its root node) that `node_id` belongs to."""
        async with self.engine.connect() as conn:
            found: str | None = await conn.scalar(select(run_nodes.c.root_id).where(run_nodes.c.id == node_id))
            return found

    async def run_trace(self, root_id: str) -> str | None:
        """A traced run's stored span context (aetr.engine.tracing), or None."""
        async with self.engine.connect() as conn:
            found: str | None = await conn.scalar(select(run_nodes.c.trace).where(run_nodes.c.id == root_id))
            return found

    async def find_run_by_key(self, key: str) -> str | None:
        """The id of the run started with this idempotency key."""
        async with self.engine.connect() as conn:
            found: str | None = await conn.scalar(
                select(run_nodes.c.id).where(run_nodes.c.idempotency_key == key))
            return found

    async def list_runs(self, state: str | None, step: str | None, limit: int, cursor: str | None,
                        id_prefix: str | None = None) -> RunPage:
        """Root runs, newest first, filtered by state, step name and the start of their id (as
        aetr.domain.ids.normal_prefix gives it), keyset-paginated."""
        q = runs_query(state, step, limit, cursor, id_prefix)
        if not state and not step:  # (SqliteStore reads it; by state or step, SQLite finds the index itself)
            q = q.execution_options(aetr_indexed_by="ix_run_nodes_root_ids" if id_prefix else "ix_run_nodes_roots")
        async with self.engine.connect() as conn:
            nodes = [codec.node_from_row(r._mapping) for r in await conn.execute(q)]
        more = len(nodes) > limit
        nodes = nodes[:limit]
        return RunPage(nodes, encode_cursor(nodes[-1].created_at, nodes[-1].id) if more and nodes else None)

    async def run_events(self, root_id: str) -> list[dict[str, Any]]:
        """A run's history in the order things happened: by time, then in the order written.

        Not by the order written alone: a callback-mode call's answer is held a few milliseconds and written
        with later answers, after events that happened since (a cancellation, another step's callback)."""
        async with self.engine.connect() as conn:
            rows = await conn.execute(select(events).where(events.c.root_id == root_id)
                                      .order_by(events.c.at, events.c.id))
            return [_plain(r._mapping) for r in rows]

    async def lease_holders(self, prefix: str) -> list[str]:
        """The owners, named starting with `prefix`, of the work leases that have not ended yet."""
        async with self.engine.connect() as conn:
            rows = await conn.execute(select(work.c.lease_owner).distinct().where(
                work.c.lease_owner.startswith(prefix, autoescape=True)))
            return [str(owner) for (owner,) in rows]

    async def release_leases(self, owner: str) -> int:
        """End every lease `owner` holds, so that its work can be claimed at once; how many rows it held."""
        async with self._write_connection() as conn:
            done = await conn.execute(update(work).where(work.c.lease_owner == owner)
                                      .values(lease_owner=None, lease_until=None))
            return int(done.rowcount)

    async def claimable_since(self) -> datetime | None:
        """When the work row that has waited longest to be claimed became claimable (its due time, or the end of
        a lease nobody renewed), if that is now or earlier; None when no row waits."""
        async with self.engine.connect() as conn:
            row = (await conn.execute(claimable_since_query(datetime.now(UTC)))).one()
        return min((t for t in row if t is not None), default=None)

    def pool_use(self) -> list[tuple[str, int, int]]:
        """Each connection pool of this process: (name, the connections it may open, those in use now)."""
        pool = self.engine.pool
        # QueuePool tells its overflow limit only by this attribute; size() is the connections it keeps.
        if not isinstance(pool, QueuePool):
            return []
        return [("sqlalchemy", pool.size() + max(0, pool._max_overflow), pool.checkedout())]

    async def setting(self, key: str, default: str) -> str:
        """The stored value of `key`, storing `default` first when there is none (first writer wins)."""
        async with self._write_connection() as conn:
            await conn.execute(self._insert_ignore(settings, {"key": key, "value": default}))
            value = await conn.scalar(select(settings.c.value).where(settings.c.key == key))
            return str(value)


class _RolledBack(Exception):
    """Carries a dry run's result out of the transaction it rolls back."""

    def __init__(self, applied: StepsApplied) -> None:
        super().__init__("dry run")
        self.applied = applied


def runs_query(state: str | None, step: str | None, limit: int, cursor: str | None,
               id_prefix: str | None = None) -> Select[Any]:
    """The query of Store.list_runs: one more run than `limit`, to know whether there is a next page."""
    q = select(*codec.NODE_COLUMNS).where(run_nodes.c.parent_id.is_(None))
    if state:
        q = q.where(run_nodes.c.state == state)
    if step:
        q = q.where(run_nodes.c.step_name == step)
    if id_prefix:
        # A range, not LIKE: an index on the id answers it whatever the column's collation. Ordered by id (the
        # millisecond each run was made, then random digits), which that index gives as it reads: ordered by
        # created_at, PostgreSQL walked every run's entry in the created_at index to find the few in range.
        low, high = prefix_bounds(id_prefix)
        q = q.where(run_nodes.c.id >= low)
        if high is not None:
            q = q.where(run_nodes.c.id < high)
        if cursor:
            q = q.where(run_nodes.c.id < decode_cursor(cursor)[1])
        return q.order_by(run_nodes.c.id.desc()).limit(limit + 1)
    if cursor:
        at, last_id = decode_cursor(cursor)
        q = q.where(tuple_(run_nodes.c.created_at, run_nodes.c.id) < tuple_(at, last_id))
    return q.order_by(run_nodes.c.created_at.desc(), run_nodes.c.id.desc()).limit(limit + 1)


def claimable_since_query(now: datetime) -> Select[tuple[datetime | None, datetime | None]]:
    """The first unleased due time and the first lease end passed, at or before `now`: one row of ix_work_lease
    each. (Ordered by the index's columns rather than min(): PostgreSQL plans min(due_at) on ix_work_due, and
    walks every leased row due earlier.)"""
    unleased = (select(work.c.due_at).where(work.c.lease_until.is_(None), work.c.due_at <= now)
                .order_by(work.c.lease_until, work.c.due_at).limit(1))
    expired = select(work.c.lease_until).where(work.c.lease_until <= now).order_by(work.c.lease_until).limit(1)
    return select(unleased.scalar_subquery(), expired.scalar_subquery())


def _plain(row: Any) -> dict[str, Any]:
    """A row as a dict with plain str keys (SQLAlchemy's quoted names trip up orjson)."""
    return {str(k): v for k, v in row.items()}


# A page cursor: the created_at of the last run on the page, in microseconds since 1970 (UTC), a dot, and its id
# as 32 hexadecimal digits. Any text of this form is a valid place to start a page from.
CURSOR_PATTERN = r"^[0-9]{1,16}\.[0-9a-f]{32}$"
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


def encode_cursor(at: datetime, node_id: str) -> str:
    """The page cursor for the run after which the next page starts."""
    aware = at if at.tzinfo is not None else at.replace(tzinfo=UTC)
    return f"{(aware - _EPOCH) // _MICROSECOND}.{uuid.UUID(node_id).hex}"


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    """The (created_at, id) a cursor stands for; ValueError when it does not match CURSOR_PATTERN."""
    if re.fullmatch(CURSOR_PATTERN, cursor) is None:
        raise ValueError("cursor is not valid: pass the next_cursor of a previous page")
    micros, _, hex_id = cursor.partition(".")
    return _EPOCH + int(micros) * _MICROSECOND, str(uuid.UUID(hex_id))


def is_integrity_error(exc: BaseException) -> bool:
    """Whether a database error is a constraint violation (a lost race on a unique key)."""
    return isinstance(exc, IntegrityError | Duplicate)

