"""Storage: the Store seam and its SQLite and PostgreSQL backends."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import create_async_engine

from aetr.store.errors import Conflict, Duplicate, NeedsScripts, StepsRefused, Unavailable
from aetr.store.requests import ClaimedWork
from aetr.store.store import RunPage, Store

DEFAULT_DATABASE_URL = "sqlite:///./aetr.db"


def async_url(url: str) -> str:
    """The SQLAlchemy async URL for a user's database URL (sqlite:///…, postgresql://…)."""
    for plain, driver in (("sqlite://", "sqlite+aiosqlite://"), ("postgresql://", "postgresql+asyncpg://"),
                          ("postgres://", "postgresql+asyncpg://")):
        if url.startswith(plain):
            return driver + url[len(plain):]
    if url.startswith(("sqlite+aiosqlite://", "postgresql+asyncpg://")):
        return url
    raise ValueError(f"unsupported database URL {url!r}: use sqlite:///path/to/file.db or postgresql://…")


DEFAULT_POOL_SIZE = 20
POOL_TIMEOUT_S = 60.0  # seconds a task may wait for a free connection before its work is retried later


def open_store(url: str, pool_size: int = DEFAULT_POOL_SIZE, sqlite_synchronous: str = "full") -> Store:
    """A Store for the database at `url` (the schema is not touched: see aetr.store.migrate).

    A process opens at most `pool_size` connections: several processes sharing one PostgreSQL must stay within
    its max_connections together. On PostgreSQL a quarter of them (at least 2) serve the colder SQLAlchemy
    paths and the rest the events; on SQLite events have one writing connection of their own.
    `sqlite_synchronous`: "full" (a commit survives a power loss) or "normal" (it survives a killed process).
    """
    full = async_url(url)
    if full.startswith("sqlite"):
        from aetr.store.sqlite import SqliteStore

        kept = max(1, pool_size // 2)
        return SqliteStore(create_async_engine(full, pool_size=kept, max_overflow=max(0, pool_size - kept),
                                               pool_timeout=POOL_TIMEOUT_S), sqlite_synchronous)
    from aetr.store.postgres import PostgresStore

    cold = max(2, pool_size // 4)
    # pre-ping: after an outage a read tests its pooled connection and reconnects, rather than answer 503
    engine = create_async_engine(full, pool_size=1, max_overflow=cold - 1, pool_timeout=POOL_TIMEOUT_S,
                                 pool_pre_ping=True)
    return PostgresStore(engine, max(2, pool_size - cold))


__all__ = ["DEFAULT_DATABASE_URL", "DEFAULT_POOL_SIZE", "ClaimedWork", "Conflict", "Duplicate", "NeedsScripts",
           "RunPage", "StepsRefused", "Store", "Unavailable", "async_url", "open_store"]
