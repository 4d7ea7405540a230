"""Bring a database's schema up to date with the Alembic migrations shipped in the package."""

from __future__ import annotations

import asyncio
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

from aetr.store import async_url

MIGRATIONS = Path(__file__).parent / "migrations"
MIGRATION_LOCK = 0x4145_5452  # "AETR": the advisory lock key that serialises migrations on PostgreSQL


def alembic_config(connection: Connection | None = None) -> Config:
    """An Alembic config pointing at the packaged migrations (and at a connection, when given)."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["connection"] = connection
    return cfg


async def upgrade_engine(engine: AsyncEngine) -> None:
    """Apply every pending migration through `engine`."""
    async with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            # Several `aetr serve` processes may start at once on one database: migrate one at a time.
            await conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({MIGRATION_LOCK})")
        await conn.run_sync(lambda sync_conn: command.upgrade(alembic_config(sync_conn), "head"))


def upgrade(database_url: str) -> None:
    """Apply every pending migration to the database at `database_url`."""

    async def run() -> None:
        engine = create_async_engine(async_url(database_url), poolclass=NullPool)
        try:
            await upgrade_engine(engine)
        finally:
            await engine.dispose()

    asyncio.run(run())
