"""Storage: the Store seam and its SQLite and PostgreSQL backends."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import create_async_engine

from aetr.store.store import ClaimedWork, Conflict, RunPage, StepsRefused, Store, Tx

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


def open_store(url: str, pool_size: int = DEFAULT_POOL_SIZE) -> Store:
    """A Store for the database at `url` (the schema is not touched: see aetr.store.migrate).

    A process opens at most `pool_size` connections (half kept open, half on demand): several processes
    sharing one PostgreSQL must stay within its max_connections together.
    """
    full = async_url(url)
    kept = max(1, pool_size // 2)
    pool = {"pool_size": kept, "max_overflow": max(0, pool_size - kept), "pool_timeout": POOL_TIMEOUT_S}
    if full.startswith("sqlite"):
        from aetr.store.sqlite import SqliteStore

        return SqliteStore(create_async_engine(full, **pool))
    from aetr.store.postgres import PostgresStore

    return PostgresStore(create_async_engine(full, **pool))


__all__ = ["DEFAULT_DATABASE_URL", "DEFAULT_POOL_SIZE", "ClaimedWork", "Conflict", "RunPage", "StepsRefused",
           "Store", "Tx", "async_url", "open_store"]
