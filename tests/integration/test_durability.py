"""The embedded default is durable: a SQLite commit is on the disk before anyone is told of it."""

from __future__ import annotations

from pathlib import Path

import pytest

from aetr.config import ConfigError, Settings
from aetr.engine.runtime import Engine
from aetr.store.migrate import upgrade_engine
from aetr.store.sqlite import SqliteStore
from aetr.testing.engine import coordinator_without_http

FULL, NORMAL = 2, 1  # what PRAGMA synchronous answers


async def _synchronous(settings: Settings) -> tuple[int, int]:
    """PRAGMA synchronous of the connection that writes events, and of the one that serves the other writes."""
    store = Engine(settings).store  # the store as `aetr serve` opens it from its settings
    assert isinstance(store, SqliteStore)
    await upgrade_engine(store.engine)
    try:
        coordinator, _ = await coordinator_without_http(store, "one", 1)
        await coordinator.start_run("one", 1, None)  # the events' writer opens with the first event
        assert store._writer is not None
        (events,) = store._writer.conn.execute("PRAGMA synchronous").fetchone()
        async with store.engine.connect() as conn:
            other = (await conn.exec_driver_sql("PRAGMA synchronous")).scalar_one()
        return int(events), int(other)
    finally:
        await store.close()


@pytest.mark.sqlite_only
async def test_sqlite_commits_are_flushed_to_disk_unless_told_otherwise(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'aetr.db'}"
    assert await _synchronous(Settings.from_env({"AETR_DATABASE_URL": url})) == (FULL, FULL)
    faster = Settings.from_env({"AETR_DATABASE_URL": url, "AETR_SQLITE_SYNCHRONOUS": "NORMAL"})
    assert await _synchronous(faster) == (NORMAL, NORMAL)


def test_an_unknown_durability_setting_is_refused_at_start() -> None:
    with pytest.raises(ConfigError, match="AETR_SQLITE_SYNCHRONOUS='off': use one of full, normal"):
        Settings.from_env({"AETR_SQLITE_SYNCHRONOUS": "off"})
