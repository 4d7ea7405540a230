"""Bring a database's schema up to date with the Alembic migrations shipped in the package."""

from __future__ import annotations

import asyncio
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

from aetr.store import async_url

MIGRATIONS = Path(__file__).parent / "migrations"
MIGRATION_LOCK = 0x4145_5452  # "AETR": the advisory lock key that serialises migrations on PostgreSQL


class SchemaTooNew(Exception):
    """The database was migrated by a newer release of AETR: this one does not know its schema."""


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
        await conn.run_sync(_upgrade)


def _upgrade(connection: Connection) -> None:
    cfg = alembic_config(connection)
    current = MigrationContext.configure(connection).get_current_revision()
    known = {script.revision for script in ScriptDirectory.from_config(cfg).walk_revisions()}
    if current is not None and current not in known:
        raise SchemaTooNew(
            f"the database's schema is at revision {current}, which this release of AETR does not know: a newer "
            "release migrated it. Run that release, or restore the backup taken before the upgrade "
            "(docs/operations.md, Upgrades)")
    command.upgrade(cfg, "head")


def upgrade(database_url: str) -> None:
    """Apply every pending migration to the database at `database_url`."""

    async def run() -> None:
        engine = create_async_engine(async_url(database_url), poolclass=NullPool)
        try:
            await upgrade_engine(engine)
        finally:
            await engine.dispose()

    asyncio.run(run())
