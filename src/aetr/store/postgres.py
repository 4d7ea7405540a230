"""PostgreSQL: several processes share it; row locks and SKIP LOCKED do the coordination.

Events run on a plain asyncpg pool with the statements prebuilt in aetr.store.sql (asyncpg prepares and
caches each one per connection); SQLAlchemy's engine keeps the colder paths (step trees, listings,
migrations) on a small pool of its own.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import asyncpg
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncEngine

from aetr.store.sql import (
    Conflict,
    Duplicate,
    Exec,
    ExecMany,
    Fetch,
    Op,
    Program,
    Statements,
    Unavailable,
    is_outage_sqlstate,
)
from aetr.store.store import AfterCommit, ScriptCall, Store, _round_trips

CONNECT_TIMEOUT_S = 10.0
# The events' statements are indexed lookups of a few rows (a wide parent's children at most), whose best plan
# never depends on the values or on the tables' size. So: generic plans, planned once per connection (planning
# the chain query cost as much as running it), and no sequential scans or hash joins in them — a plan made
# while the tables were nearly empty otherwise stays cached, and the chain query then scanned every node of a
# 10,000-child run on each of its callbacks.
EVENTS_SESSION = {"plan_cache_mode": "force_generic_plan", "enable_seqscan": "off", "enable_hashjoin": "off",
                  "enable_mergejoin": "off"}


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
        super().__init__(engine, Statements("postgresql"))
        self.dsn = engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
        self.pool_size = pool_size
        self._pool: asyncpg.Pool | None = None
        self._pool_lock = asyncio.Lock()

    async def _events_pool(self) -> asyncpg.Pool:
        if self._pool is None:
            async with self._pool_lock:
                if self._pool is None:
                    self._pool = await asyncpg.create_pool(
                        self.dsn, min_size=1, max_size=self.pool_size, reset=_keep_session,
                        timeout=CONNECT_TIMEOUT_S, server_settings=EVENTS_SESSION)
        return self._pool

    async def run(self, program: Program, scripts: ScriptCall | None = None,
                  after_commit: Callable[[Any], None] | None = None) -> Any:
        # Shielded: a caller that goes away (a client hanging up) must not cut an event between its
        # statements, nor skip what follows its commit (calling the steps it started).
        task = asyncio.ensure_future(self._run(program, scripts, after_commit, _round_trips.get()))
        return await asyncio.shield(task)

    async def _run(self, program: Program, scripts: ScriptCall | None, after_commit: AfterCommit | None,
                   seen: list[str] | None) -> Any:
        with _translated():
            pool = await self._events_pool()
            async with pool.acquire() as conn:
                lazy = _LazyTransaction(conn)
                try:
                    result = await self._drive(program, self.statements, scripts, seen, lazy.execute)
                    await lazy.commit()
                except BaseException:
                    await lazy.rollback()
                    raise
        if after_commit is not None:
            after_commit(result)
        return result

    async def _fetch_view(self, text: str, args: tuple[Any, ...]) -> list[dict[str, Any]]:
        with _translated():
            pool = await self._events_pool()
            rows = await pool.fetch(text, *args)
        view = self.statements.view
        return [view(r) for r in rows]

    async def close(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await pool.close()
        await super().close()

    def _insert_ignore(self, table: Any, values: dict[str, Any]) -> Any:
        return pg_insert(table).values(**values).on_conflict_do_nothing()
