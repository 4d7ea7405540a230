"""PostgreSQL: several processes share it; row locks and SKIP LOCKED do the coordination.

Events run on a plain asyncpg pool with the statements prebuilt in aetr.store.postgres_sql (asyncpg prepares and
caches each one per connection); SQLAlchemy's engine keeps the colder paths (step trees, listings,
migrations) on a small pool of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import operator
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import asyncpg
import orjson
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncEngine

from aetr.store.codec import NODE_COLUMNS
from aetr.store.errors import Conflict, Duplicate, Unavailable, is_outage_sqlstate
from aetr.store.lowering import lower
from aetr.store.operations import Exec, ExecMany, Fetch, Op, OpStream, Sql
from aetr.store.postgres_sql import ROW_GROUPS, PostgresStatements
from aetr.store.requests import Program
from aetr.store.statements import HANDING_S
from aetr.store.store import AfterCommit, ScriptAnswers, Store, _round_trips
from aetr.store.views import view_of_row

CONNECT_TIMEOUT_S = 10.0
# The events' statements are indexed lookups of a few rows (a wide parent's children at most), whose best plan
# never depends on the values or on the tables' size. So: generic plans, planned once per connection (planning
# the chain query cost as much as running it), and no sequential scans or hash joins in them — a plan made
# while the tables were nearly empty otherwise stays cached, and the chain query then scanned every node of a
# 10,000-child run on each of its callbacks. No bitmap scans either: the work table is a queue, whose statistics
# are stale by the time a burst fills it (until autovacuum analyzes it, a minute later at best); believing a
# handful of queued rows, the plan read all 5,000 attempts waiting for a slot and sorted them on each claim of
# the oldest (10 ms), where the due-time index read in order stops at the first one (0.1 ms). And no JIT: a plan
# with a disabled node is costed at 10^10, which set off 280 ms of compiling for a read of a few rows.
EVENTS_SESSION = {"plan_cache_mode": "force_generic_plan", "enable_seqscan": "off", "enable_hashjoin": "off",
                  "enable_mergejoin": "off", "enable_bitmapscan": "off", "jit": "off"}


async def _keep_session(_conn: asyncpg.Connection) -> None:
    """Pool reset hook: our transactions always end, so returning a connection needs no round trip."""


@contextmanager
def _translated() -> Iterator[None]:
    """asyncpg's errors as the store's: a lost race, a taken key, or an outage to wait out."""
    try:
        yield
    except (asyncpg.DeadlockDetectedError, asyncpg.SerializationError) as exc:
        raise Conflict(f"the database aborted the transaction ({exc.sqlstate})") from exc
    except asyncpg.UniqueViolationError as exc:
        raise Duplicate(str(exc)) from exc
    except asyncpg.PostgresError as exc:
        if is_outage_sqlstate(exc.sqlstate):
            raise Unavailable(f"PostgreSQL refused: {type(exc).__name__}") from exc
        raise
    except (OSError, TimeoutError, asyncpg.InterfaceError) as exc:  # unreachable, dropped, or timed out
        raise Unavailable(f"PostgreSQL unreachable: {type(exc).__name__}") from exc
    except asyncpg.InternalClientError as exc:
        # A connection whose server process was ended in the middle of a statement (a restart, an operator's
        # pg_terminate_backend) can be left by asyncpg waiting for the rest of that statement's answer; the next
        # use fails with "another operation is in progress" (known of asyncpg; SQLAlchemy maps it too). An outage.
        raise Unavailable(f"PostgreSQL connection lost mid-statement: {exc}") from exc


MAX_BATCHES = 4  # batches of events in flight at once, each on a connection of its own
MAX_START_BATCHES = 2  # batches of run starts in flight at once, besides those: starts never hold up the others
MAX_BATCH = 256  # events in one batch


def _merged(writes: list[dict[str, Any]]) -> dict[str, Any]:
    """Several events' write_all values as one: their rows end to end, node, call and deadline rows in node id
    order (the order every event locks rows in), and the number of node rows expected updated summed. A group no
    event has rows in stays NULL. The `complete` rows of parents whose children are all counted here take the
    earliest due time and lease end of the events that count (their lease owner is this process)."""
    merged: dict[str, Any] = {}
    for name in ("drop", "beats", *ROW_GROUPS):
        parts = [w[name] for w in writes if w[name]]
        merged[name] = [v for part in parts for v in part] if parts else None
    merged["expected"] = sum(w["expected"] for w in writes)
    counting = [w for w in writes if w["b_"]]
    merged["b_owner"] = next((w["b_owner"] for w in counting if w["b_owner"] is not None), None)
    for name in ("b_due", "b_until"):
        merged[name] = min((w[name] for w in counting if w[name] is not None), default=None)
    for group, key in (("n_", "k_id"), ("f_", "node_id"), ("m_", "node_id")):
        if merged[group] is not None:
            merged[group].sort(key=operator.itemgetter(key))
    for name in ("drop", "beats"):
        if merged[name] is not None:
            merged[name].sort()
    return merged


def _completions(members: list[_Member], rows: list[Any]) -> list[list[tuple[Any, ...]]]:
    """write_all's answer to a merged batch, split: each parent it completed goes to the first member that
    counted one of its children (that member completes it), the others are told of none."""
    ((expected, completed),) = rows
    if not completed:  # most batches: no parent completed, every member's answer is the same
        return [rows] * len(members)
    left = set(completed)
    out = []
    for m in members:
        mine = [p for p in dict.fromkeys(c["node_id"] for c in m.op.values["b_"] or ()) if p in left]
        left.difference_update(mine)
        out.append([(expected, mine or None)])
    return out


@dataclass(eq=False)
class _Member:
    """One program in a batch: its operations, its next one, and the future its caller awaits."""

    ops: OpStream
    scripts: ScriptAnswers | None
    after_commit: AfterCommit | None
    seen: list[str] | None
    done: asyncio.Future[Any]
    op: Any = None
    wrote: bool = False  # its one write, which committed by itself, is done
    alone: bool = False  # it left the batch to go on on a connection of its own
    claimed_for: bool = False  # its chain read claimed a waiting attempt for the slot its event frees

    def advance(self, answer: Any) -> bool:
        """Hand the program its answer; True while it has another operation (now in `op`)."""
        try:
            self.op = self.ops.send(answer)
        except StopIteration as stop:
            self.finish(stop.value)
            return False
        except Exception as exc:
            self.fail(exc)
            return False
        return True

    def saw(self, sql: Sql) -> None:
        if self.seen is not None:
            self.seen.append(sql.text)

    def finish(self, result: Any) -> None:
        try:
            if self.after_commit is not None:
                self.after_commit(result)
        except Exception as exc:
            self.fail(exc)
            return
        if not self.done.done():
            self.done.set_result(result)

    def fail(self, exc: BaseException) -> None:
        if not self.done.done():
            self.done.set_exception(exc)
            self.done.exception()  # retrieved: a caller that went away need not see it


_NODE_NAMES = [c.name for c in NODE_COLUMNS]
_STEP_ID, _STATE, _HOLDS_SLOT, _CONFIG = (_NODE_NAMES.index(n) for n in ("step_id", "state", "holds_slot", "config"))


def _limit_of(node: tuple[Any, ...]) -> int:
    """The max_concurrency of a waiting api node's step, from its row."""
    limit: int = orjson.loads(node[_CONFIG])["max_concurrency"]
    return limit


@dataclass
class _Claimed:
    """The attempts a batch's chain read claimed for the slots its events free (chains_claiming_stmt), by step,
    until its events' NextWaiting take them; what is left is given back when the batch ends."""

    until: Any = None
    by_step: dict[str, list[tuple[Any, ...]]] = field(default_factory=dict)

    def take(self, step_id: str, count: int, besides: set[str]) -> list[tuple[Any, ...]]:
        rows = self.by_step.get(step_id, [])
        got = [r for r in rows if r[0] not in besides][:count]
        if got:
            self.by_step[step_id] = [r for r in rows if r not in got]
        return got

    def left(self) -> list[str]:
        return [r[0] for rows in self.by_step.values() for r in rows]


class _LazyTransaction:
    """Runs a program's statements on one connection, opening its transaction only at the first write.

    Reads go out on their own (each sees the latest commits, as it would inside a READ COMMITTED
    transaction). A program whose only write is a statement atomic by itself (`Sql.alone`: an event's
    single write, a count, a claim) runs with no BEGIN and COMMIT at all, two round trips fewer, and holds
    no lock while it reads or waits for a mapper.
    """

    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn
        self.tx: Any = None
        self.wrote_alone = False

    async def execute(self, op: Op) -> Any:
        sql, conn = op.sql, self.conn
        if sql.writes:
            if self.wrote_alone:
                raise RuntimeError("a program wrote again after a statement it ran without a transaction")
            if self.tx is None:
                if sql.alone and not isinstance(op, ExecMany):
                    self.wrote_alone = True
                else:
                    self.tx = conn.transaction()
                    await self.tx.start()
        if isinstance(op, Fetch):
            return await conn.fetch(sql.text, *sql.args(op.values))
        if isinstance(op, Exec):
            status = await conn.execute(sql.text, *sql.args(op.values))
            return int(status.rsplit(" ", 1)[-1])
        await conn.executemany(sql.text, [sql.args(v) for v in op.values])
        return None

    async def commit(self) -> None:
        if self.tx is not None:
            await self.tx.commit()

    async def rollback(self) -> None:
        if self.tx is not None and not self.conn.is_closed():
            await self.tx.rollback()


class PostgresStore(Store):
    """Store on PostgreSQL through asyncpg."""

    dialect = "postgresql"

    def __init__(self, engine: AsyncEngine, pool_size: int) -> None:
        super().__init__(engine, PostgresStatements())
        self.dsn = engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
        self.pool_size = pool_size
        self._pool: asyncpg.Pool | None = None
        self._pool_lock = asyncio.Lock()
        self._queue: list[_Member] = []  # events waiting for a batch, run starts aside
        self._start_queue: list[_Member] = []  # run starts waiting for a batch of their own
        self._batches = 0
        self._start_batches_running = 0
        self._starting = False
        self._tasks: set[asyncio.Task[None]] = set()

    async def _events_pool(self) -> asyncpg.Pool:
        if self._pool is None:
            async with self._pool_lock:
                if self._pool is None:
                    self._pool = await asyncpg.create_pool(
                        self.dsn, min_size=1, max_size=self.pool_size, reset=_keep_session,
                        timeout=CONNECT_TIMEOUT_S, server_settings=EVENTS_SESSION)
        return self._pool

    async def run(self, program: Program, scripts: ScriptAnswers | None = None,
                  after_commit: Callable[[Any], None] | None = None, start: bool = False) -> Any:
        # Shielded: a caller that goes away (a client hanging up) must not cut an event between its
        # statements, nor skip what follows its commit (calling the steps it started).
        member = _Member(lower(program, self.statements), scripts, after_commit, _round_trips.get(),
                         asyncio.get_running_loop().create_future())
        (self._start_queue if start else self._queue).append(member)
        self._start_batches()
        return await asyncio.shield(member.done)

    # ---- batches: the events that arrive together share their round trips --------------------------------

    def _start_batches(self) -> None:
        # One batch at a time is starting: it takes every event queued by the time it runs. Run starts go in
        # batches of their own, on connections of their own, so a callback never waits for a run's insert.
        if self._starting:
            return
        if self._queue and self._batches < MAX_BATCHES:
            self._starting = True
            self._batches += 1
            self._spawn(self._batch(starts=False), batch=self._batch_done)
        elif self._start_queue and self._start_batches_running < MAX_START_BATCHES:
            self._starting = True
            self._start_batches_running += 1
            self._spawn(self._batch(starts=True), batch=self._start_batch_done)

    def _spawn(self, work: Coroutine[Any, Any, None],
               batch: Callable[[asyncio.Task[None]], None] | None = None) -> None:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(batch or self._tasks.discard)

    def _batch_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._batches -= 1
        self._start_batches()

    def _start_batch_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._start_batches_running -= 1
        self._start_batches()

    async def _batch(self, starts: bool) -> None:
        """Run programs side by side on one connection while they only read their chains and write once: one
        chain query and one write statement serve them all. A program that asks anything else goes on alone."""
        st = self.statements
        slot_ops = (st.take_slot, st.make_slots, st.claim_waiting)
        if starts:
            members, self._start_queue = self._start_queue[:MAX_BATCH], self._start_queue[MAX_BATCH:]
        else:
            members, self._queue = self._queue[:MAX_BATCH], self._queue[MAX_BATCH:]
        self._starting = False
        self._start_batches()
        try:
            with _translated():
                pool = await self._events_pool()
                async with pool.acquire() as conn:
                    claimed = _Claimed()
                    active = [m for m in members if m.advance(None)]
                    while active:
                        chains: list[_Member] = []
                        writes: list[_Member] = []
                        lookups: list[_Member] = []
                        counts: list[_Member] = []
                        slots: list[_Member] = []
                        wakes: list[_Member] = []
                        for m in active:
                            sql = m.op.sql if isinstance(m.op, Fetch | Exec) else None
                            if sql is st.load_chain and not m.wrote:
                                chains.append(m)
                            elif sql in slot_ops and not m.wrote:
                                slots.append(m)
                            elif sql is st.wake_waiters:
                                wakes.append(m)
                            elif sql is st.write_all and not m.wrote:
                                writes.append(m)
                            elif sql is st.load_tree or sql is st.find_key:
                                lookups.append(m)
                            elif sql is st.count_children and not m.wrote:
                                counts.append(m)
                            else:
                                m.alone = True
                                self._spawn(self._alone(m))
                        active = (await self._look_up(conn, lookups)
                                  + await self._read_chains(conn, chains, claimed)
                                  + await self._slots(conn, slots, claimed) + await self._write(conn, writes)
                                  + await self._count(conn, counts) + await self._wake(conn, wakes))
                    if claimed.left():
                        await self._unclaim(conn, claimed)
        except BaseException as exc:
            for m in members:
                if not m.alone:
                    m.fail(exc)
            if not isinstance(exc, Exception):
                raise

    @staticmethod
    async def _look_up(conn: asyncpg.Connection, members: list[_Member]) -> list[_Member]:
        """Small reads (a step tree, an idempotency key), each sent once for every member asking the same."""
        answers: dict[tuple[str, tuple[Any, ...]], list[asyncpg.Record]] = {}
        going = []
        for m in members:
            sql = m.op.sql
            key = (sql.text, sql.args(m.op.values))
            if key not in answers:
                answers[key] = await conn.fetch(sql.text, *key[1])
            m.saw(sql)
            if m.advance(answers[key]):
                going.append(m)
        return going

    async def _read_chains(self, conn: asyncpg.Connection, members: list[_Member],
                           claimed: _Claimed) -> list[_Member]:
        """The chains of several events in one statement. Events that end an attempt also claim, in it, the
        longest-waiting attempts of the steps whose slots those attempts hold: what their NextWaiting asks
        for after deciding (see _slots)."""
        if not members:
            return []
        st = self.statements
        ending = [m for m in members if m.op.values.get("ends")]
        if len(members) == 1 and not ending:
            (m,) = members
            m.saw(st.load_chain)
            return [m] if m.advance(await conn.fetch(st.load_chain.text, *st.load_chain.args(m.op.values))) else []
        sql = st.load_chains_claiming if ending else st.load_chains
        assert sql is not None
        ids = list({m.op.values["node_id"] for m in members})
        values: dict[str, Any] = {"ids": ids}
        if ending:
            now = min(m.op.values["now"] for m in ending)
            if claimed.until is None:  # one lease end a batch, which its leftovers are given back by
                claimed.until = now + timedelta(seconds=HANDING_S)
            values.update(ends=list({m.op.values["node_id"] for m in ending}), now=now, until=claimed.until)
        by_node: dict[str, list[tuple[Any, ...]]] = {i: [] for i in ids}
        for row in await conn.fetch(sql.text, *sql.args(values)):
            if row[1] == 2:  # an attempt claimed for a slot
                waiting = tuple(row)[2:]
                claimed.by_step.setdefault(waiting[_STEP_ID], []).append(waiting)
                continue
            node = tuple(row)[1:]
            for start in row[0]:
                by_node[start].append(node)
        for m in ending:
            node_id = m.op.values["node_id"]
            m.claimed_for = any(extra == 0 and own[0] == node_id and own[_HOLDS_SLOT] and own[_STATE] == "executing"
                                for extra, *own in by_node[node_id])
        for m in members:
            m.saw(sql)
        return [m for m in members if m.advance(by_node[m.op.values["node_id"]])]

    async def _write(self, conn: asyncpg.Connection, members: list[_Member]) -> list[_Member]:
        """The events' writes merged into one statement; when that statement aborts (a node changed meanwhile,
        or one event's values were refused), each event's write again on its own, so only the culprits fail."""
        if not members:
            return []
        sql = self.statements.write_all
        assert sql is not None
        for m in members:
            m.saw(sql)
            m.wrote = True
        if len(members) > 1:
            try:
                rows = await conn.fetch(sql.text, *sql.args(_merged([m.op.values for m in members])))
            except asyncpg.PostgresError as exc:
                if is_outage_sqlstate(exc.sqlstate):
                    raise
            else:
                return [m for m, own in zip(members, _completions(members, rows), strict=True) if m.advance(own)]
        going = []
        for m in members:
            try:
                with _translated():
                    rows = await conn.fetch(sql.text, *sql.args(m.op.values))
            except (Conflict, Duplicate, asyncpg.PostgresError) as exc:
                m.fail(exc)
                continue
            if m.advance(rows):
                going.append(m)
        return going

    async def _count(self, conn: asyncpg.Connection, members: list[_Member]) -> list[_Member]:
        """Several events' counts of finished children as one statement (their arrays end to end); the first
        member of each parent whose count is now complete is told so (it completes the parent)."""
        if not members:
            return []
        sql = self.statements.count_children
        assert sql is not None
        values = {**members[0].op.values, "parent_ids": [p for m in members for p in m.op.values["parent_ids"]],
                  "positions": [p for m in members for p in m.op.values["positions"]]}
        complete = {row[0] for row in await conn.fetch(sql.text, *sql.args(values))}
        going = []
        for m in members:
            m.saw(sql)
            m.wrote = True
            (parent,) = m.op.values["parent_ids"]
            last = parent in complete
            complete.discard(parent)
            if m.advance([(parent,)] if last else []):
                going.append(m)
        return going

    async def _slots(self, conn: asyncpg.Connection, members: list[_Member], claimed: _Claimed) -> list[_Member]:
        """Several events' slot takes and claims of waiting attempts in one transaction, one commit for all; each
        event goes on once they are committed. The rows they lock are others' to skip until then (a moment).

        The takes of one step share one statement, and so do the claims: each hand-on of a limited step under
        load is one event of a batch, and a round trip each was most of what a batch spent."""
        if not members:
            return []
        st = self.statements
        answers: dict[int, list[Any]] = {}
        takes: dict[tuple[str, int], list[int]] = {}
        claims: dict[str, list[int]] = {}
        for i, m in enumerate(members):
            m.saw(m.op.sql)
            if m.op.sql is st.take_slot:
                takes.setdefault((m.op.values["step_id"], m.op.values["limit"]), []).append(i)
            elif m.op.sql is st.claim_waiting:
                claims.setdefault(m.op.values["step_id"], []).append(i)
        # The attempts the chain read claimed go first, to the events it claimed them for first. An event it
        # claimed for that finds fewer than it asks for was looking at every waiting attempt its step had: one
        # parked since is found after the commit, as when a claim finds none (see WAKE_WAITERS_PG).
        short: dict[int, int] = {}
        for step_id, group in list(claims.items()):
            for i in sorted(group, key=lambda i: not members[i].claimed_for):
                v = members[i].op.values
                answers[i] = claimed.take(step_id, v["count"], set(v["besides"]))
                if len(answers[i]) < v["count"] and not (members[i].claimed_for and v["count"] == 1):
                    short[i] = v["count"] - len(answers[i])
            claims[step_id] = [i for i in group if i in short]
            if not claims[step_id]:
                del claims[step_id]
        grouped = {i for group in (*takes.values(), *claims.values()) for i in group}
        grouped |= {i for i, m in enumerate(members) if m.op.sql is st.claim_waiting}
        others = [i for i in range(len(members)) if i not in grouped]
        # One statement is atomic by itself: no BEGIN and COMMIT around it (the usual batch under load).
        alone = len(takes) + len(claims) + len(others) <= 1
        async with contextlib.nullcontext() if alone else conn.transaction():
            for (step_id, limit), group in takes.items():
                answers.update(await self._take_slots(conn, step_id, limit, [members[i] for i in group], group))
            for step_id, group in claims.items():
                fetched = await self._claim_waiting(conn, step_id, [members[i] for i in group], group,
                                                    [short[i] for i in group])
                for i, rows in fetched.items():
                    answers[i] = [*answers[i], *rows]
            for i in others:
                sql = members[i].op.sql
                answers[i] = await conn.fetch(sql.text, *sql.args(members[i].op.values))
        return [m for i, m in enumerate(members) if m.advance(answers[i])]

    async def _take_slots(self, conn: asyncpg.Connection, step_id: str, limit: int, members: list[_Member],
                          places: list[int]) -> dict[int, list[Any]]:
        """Free slots of one step for several events' attempts, one statement; each member's take_slot answer."""
        sql = self.statements.take_slots
        assert sql is not None
        # An attempt asked for twice (two events of one batch) takes one slot, and both are told of it.
        pairs = list(dict.fromkeys((m.op.values["node_id"], m.op.values["attempt"]) for m in members))
        rows = await conn.fetch(sql.text, *sql.args({"step_id": step_id, "limit": limit,
                                                     "node_ids": [n for n, _ in pairs],
                                                     "attempts": [a for _, a in pairs]}))
        by_pair = {pair: [tuple(row)[1:]] for pair, row in zip(pairs, rows, strict=True)}
        return {i: by_pair[(m.op.values["node_id"], m.op.values["attempt"])]
                for i, m in zip(places, members, strict=True)}

    async def _claim_waiting(self, conn: asyncpg.Connection, step_id: str, members: list[_Member],
                             places: list[int], counts: list[int]) -> dict[int, list[Any]]:
        """The attempts of one step that waited longest, as many as several events freed slots for (`counts`
        still to find), claimed in one statement and shared out among them. None is due later than the earliest
        event's time, and none is an attempt any of the events changed itself."""
        sql = self.statements.claim_waiting
        assert sql is not None
        values = [{**m.op.values, "count": count} for m, count in zip(members, counts, strict=True)]
        if len(values) == 1:
            return {places[0]: await conn.fetch(sql.text, *sql.args(values[0]))}
        merged = {"step_id": step_id, "count": sum(v["count"] for v in values), "now": min(v["now"] for v in values),
                  "besides": sorted({b for v in values for b in v["besides"]}),
                  "until": max(v["until"] for v in values)}
        rows = await conn.fetch(sql.text, *sql.args(merged))
        out: dict[int, list[Any]] = {}
        at = 0
        for i, v in zip(places, values, strict=True):
            out[i], at = rows[at:at + v["count"]], at + v["count"]
        return out

    async def _unclaim(self, conn: asyncpg.Connection, claimed: _Claimed) -> None:
        """The attempts a batch's chain read claimed and no event of it was handed: waiting again, and woken
        where their step has a slot free (their claim hid them from whoever freed it meanwhile)."""
        st = self.statements
        assert st.unclaim is not None and st.wake_waiters is not None
        await conn.execute(st.unclaim.text, *st.unclaim.args({"node_ids": claimed.left(), "until": claimed.until}))
        for step_id, rows in claimed.by_step.items():
            if rows:
                limit = _limit_of(rows[0])
                await conn.execute(st.wake_waiters.text,
                                   *st.wake_waiters.args({"step_id": step_id, "limit": limit, "count": len(rows)}))
        claimed.by_step.clear()

    async def _wake(self, conn: asyncpg.Connection, members: list[_Member]) -> list[_Member]:
        """Several events' wake-ups of waiting attempts after their commits: one statement per step and limit,
        waking as many as they asked for together."""
        if not members:
            return []
        sql = self.statements.wake_waiters
        assert sql is not None
        wanted: dict[tuple[str, int], int] = {}
        for m in members:
            key = (m.op.values["step_id"], m.op.values["limit"])
            wanted[key] = wanted.get(key, 0) + m.op.values["count"]
        for (step_id, limit), count in wanted.items():
            await conn.execute(sql.text, *sql.args({"step_id": step_id, "limit": limit, "count": count}))
        for m in members:
            m.saw(sql)
        return [m for m in members if m.advance(0)]

    async def _alone(self, m: _Member) -> None:
        """A program on a connection of its own, from its next operation on."""
        try:
            with _translated():
                pool = await self._events_pool()
                async with pool.acquire() as conn:
                    lazy = _LazyTransaction(conn)
                    lazy.wrote_alone = m.wrote
                    try:
                        result = await self._drive(m.ops, m.scripts, m.seen, lazy.execute, pending=m.op)
                        await lazy.commit()
                    except BaseException:
                        await lazy.rollback()
                        raise
        except BaseException as exc:
            m.fail(exc)
            if not isinstance(exc, Exception):
                raise
            return
        m.finish(result)

    async def _fetch_view(self, text: str, args: tuple[Any, ...]) -> list[dict[str, Any]]:
        return [view_of_row(r) for r in await self._fetch_rows(text, args)]

    async def _fetch_rows(self, text: str, args: tuple[Any, ...]) -> list[Any]:
        with _translated():
            pool = await self._events_pool()
            rows: list[Any] = await pool.fetch(text, *args)
        return rows

    def pool_use(self) -> list[tuple[str, int, int]]:
        pool = self._pool  # opened by the first event
        in_use = pool.get_size() - pool.get_idle_size() if pool is not None else 0
        return [*super().pool_use(), ("events", self.pool_size, in_use)]

    async def close(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await pool.close()
        await super().close()

    def _insert_ignore(self, table: Any, values: dict[str, Any]) -> Any:
        return pg_insert(table).values(**values).on_conflict_do_nothing()
