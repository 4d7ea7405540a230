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


def open_store(url: str) -> Store:
    """A Store for the database at `url` (the schema is not touched: see aetr.store.migrate)."""
    full = async_url(url)
    if full.startswith("sqlite"):
        from aetr.store.sqlite import SqliteStore

        return SqliteStore(create_async_engine(full, pool_size=8, max_overflow=8))
    from aetr.store.postgres import PostgresStore

    return PostgresStore(create_async_engine(full, pool_size=20, max_overflow=20, pool_pre_ping=False))


__all__ = ["DEFAULT_DATABASE_URL", "ClaimedWork", "Conflict", "RunPage", "StepsRefused", "Store", "Tx",
           "async_url", "open_store"]
