"""SQLite: the embedded default. One writer at a time (WAL lets readers go on), polled wake-ups."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from sqlalchemy import event
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from aetr.store.store import Store

BUSY_TIMEOUT_MS = 30_000  # milliseconds another process may hold the write lock before we give up


class SqliteStore(Store):
    """Store on a SQLite file: writes serialised in-process, IMMEDIATE transactions across processes."""

    dialect = "sqlite"

    def __init__(self, engine: AsyncEngine) -> None:
        super().__init__(engine)
        self._write_lock = asyncio.Lock()

        @event.listens_for(engine.sync_engine, "connect")
        def on_connect(dbapi_conn: Any, _record: Any) -> None:
            # Take transaction control from the driver so that we choose BEGIN IMMEDIATE for writers.
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            cur.close()

        @event.listens_for(engine.sync_engine, "begin")
        def on_begin(conn: Any) -> None:
            # Readers run in autocommit (each statement sees a consistent WAL snapshot); writers take
            # the write lock up front, so two writers never deadlock upgrading a read lock.
            if conn.get_execution_options().get("aetr_write"):
                conn.exec_driver_sql("BEGIN IMMEDIATE")

    @asynccontextmanager
    async def _write_connection(self) -> AsyncIterator[AsyncConnection]:
        async with self._write_lock, self.engine.connect() as conn:
            conn = await conn.execution_options(aetr_write=True)
            async with conn.begin():
                yield conn

    def _insert_ignore(self, table: Any, values: dict[str, Any]) -> Any:
        return sqlite_insert(table).values(**values).on_conflict_do_nothing()
