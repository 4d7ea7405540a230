"""The migrations build exactly the schema the models declare, on both backends."""

from __future__ import annotations

from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from aetr.store import Store
from aetr.store.migrate import SchemaTooNew, upgrade_engine
from aetr.store.tables import metadata


async def test_migrations_produce_the_declared_schema(store: Store) -> None:
    def diff(sync_conn: Any) -> list[Any]:
        ctx = MigrationContext.configure(sync_conn, opts={"compare_type": True})
        return list(compare_metadata(ctx, metadata))

    async with store.engine.connect() as conn:
        assert await conn.run_sync(diff) == []


async def test_upgrading_twice_changes_nothing(store: Store) -> None:
    await upgrade_engine(store.engine)
    async with store.engine.connect() as conn:
        version = (await conn.exec_driver_sql("SELECT version_num FROM alembic_version")).scalar_one()
    assert version == "0013"


async def test_a_database_migrated_by_a_newer_release_is_refused_with_a_sentence_and_left_alone(store: Store) -> None:
    async with store.engine.begin() as conn:
        head = (await conn.exec_driver_sql("SELECT version_num FROM alembic_version")).scalar_one()
        await conn.exec_driver_sql("UPDATE alembic_version SET version_num = '0999_from_the_future'")
    with pytest.raises(SchemaTooNew, match=r"revision 0999_from_the_future, .* a newer release migrated it"):
        await upgrade_engine(store.engine)
    async with store.engine.begin() as conn:
        version = (await conn.exec_driver_sql("SELECT version_num FROM alembic_version")).scalar_one()
        await conn.exec_driver_sql(f"UPDATE alembic_version SET version_num = '{head}'")
    assert version == "0999_from_the_future"
