"""The embedded default is durable: a SQLite commit is on the disk before anyone is told of it."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from pathlib import Path

import pytest
from sqlalchemy.ext.asyncio import create_async_engine

from aetr.config import ConfigError, Settings
from aetr.engine.runtime import Engine
from aetr.store import sqlite as sqlite_store
from aetr.store.migrate import upgrade_engine
from aetr.store.sqlite import CHECKPOINT_FRAMES, WAL_RESTART_FRAMES, SqliteStore
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


async def _commit_threads(path: Path, synchronous: str, runs: int) -> tuple[list[str], int]:
    """The threads that ran each COMMIT of the events' writer while `runs` runs start together and their first
    steps then report together; and how many of the runs went on to their second step."""
    store = SqliteStore(create_async_engine(f"sqlite+aiosqlite:///{path}"), synchronous)
    await upgrade_engine(store.engine)
    try:
        coordinator, kept = await coordinator_without_http(store, "two", 2)
        await coordinator.start_run("two", 0, None)  # opens the writer
        assert store._writer is not None
        threads: list[str] = []
        store._writer.conn.set_trace_callback(
            lambda sql: threads.append(threading.current_thread().name) if sql == "COMMIT" else None)
        await asyncio.gather(*(coordinator.start_run("two", i, None) for i in range(runs)))
        await kept.succeed(coordinator, "first")  # one event each, queued together: a group of runs + 1
        return threads, len(kept.calls)
    finally:
        await store.close()


@pytest.mark.sqlite_only
async def test_a_big_group_waits_for_the_disk_on_a_thread_and_a_lone_event_on_the_loop(tmp_path: Path) -> None:
    threads, advanced = await _commit_threads(tmp_path / "full.db", "full", 40)
    assert advanced == 41  # every event of the big group was committed and handed its next call
    off_loop = [t for t in threads if t.startswith("aetr-sqlite-commit")]
    assert off_loop, f"every COMMIT ran on the loop's thread: {threads}"
    assert len(off_loop) < len(threads), "the starts' small groups commit on the loop's thread"
    lone, _ = await _commit_threads(tmp_path / "lone.db", "full", 0)
    assert lone == [threading.main_thread().name]
    normal, advanced = await _commit_threads(tmp_path / "normal.db", "normal", 40)  # NORMAL does not fsync at COMMIT
    assert advanced == 41 and set(normal) == {threading.main_thread().name}


@pytest.mark.sqlite_only
@pytest.mark.parametrize("at_once", [2, 16])
async def test_the_wal_is_copied_back_on_a_thread_and_starts_over(tmp_path: Path, at_once: int) -> None:
    """The events' writer leaves checkpoints to a thread of its own, not to a COMMIT on the loop's thread, and
    the WAL still starts over now and then, whether events come few at a time (checkpoints beside the commits)
    or many (the writer's own): its file stays bounded however much is written."""
    path = tmp_path / "aetr.db"
    store = SqliteStore(create_async_engine(f"sqlite+aiosqlite:///{path}"), "full")
    await upgrade_engine(store.engine)
    try:
        coordinator, _ = await coordinator_without_http(store, "two", 2)
        await coordinator.start_run("two", 0, None)  # opens the writer
        writer = store._writer
        assert writer is not None and writer._checkpoints is not None
        checkpoints: list[str] = []
        for conn in (writer.conn, writer._checkpoints._conn):
            conn.set_trace_callback(
                lambda sql: checkpoints.append(threading.current_thread().name) if "checkpoint(" in sql else None)
        restarts, last = 0, 0
        for _ in range(5000):  # a start writes a few pages
            await asyncio.gather(*(coordinator.start_run("two", i, None) for i in range(at_once)))
            _, frames = writer._checkpoints.frames()
            restarts, last = restarts + (frames < last), frames
            if restarts >= 2:
                break
        assert restarts >= 2, f"the WAL never started over ({len(checkpoints)} checkpoints)"
        assert checkpoints and all(t.startswith("aetr-sqlite-checkpoint") for t in checkpoints), checkpoints
        frame = 4096 + 24  # a page and its header
        assert (tmp_path / "aetr.db-wal").stat().st_size <= (WAL_RESTART_FRAMES + CHECKPOINT_FRAMES) * frame
    finally:
        await store.close()


@pytest.mark.sqlite_only
async def test_a_reader_holding_a_snapshot_keeps_the_wal_only_until_it_ends(tmp_path: Path) -> None:
    """A backup holds a snapshot: the WAL cannot start over meanwhile, and events still commit; once it ends,
    the WAL is copied back and starts over again."""
    path = tmp_path / "aetr.db"
    store = SqliteStore(create_async_engine(f"sqlite+aiosqlite:///{path}"), "full")
    await upgrade_engine(store.engine)
    reader = sqlite3.connect(path, isolation_level=None)
    try:
        coordinator, _ = await coordinator_without_http(store, "two", 2)
        await coordinator.start_run("two", 0, None)
        assert store._writer is not None and store._writer._checkpoints is not None
        checkpoints = store._writer._checkpoints
        reader.execute("BEGIN")
        (before,) = reader.execute("SELECT count(*) FROM run_nodes").fetchone()
        for _ in range(5000):  # a start writes a few pages
            await coordinator.start_run("two", 1, None)
            if checkpoints.frames()[1] >= 2 * WAL_RESTART_FRAMES:
                break
        assert checkpoints.frames()[1] >= 2 * WAL_RESTART_FRAMES, "the WAL started over under a reader's snapshot"
        assert reader.execute("SELECT count(*) FROM run_nodes").fetchone() == (before,)  # its snapshot held
        reader.execute("COMMIT")
        longest = checkpoints.frames()[1]
        for _ in range(2000):
            await coordinator.start_run("two", 1, None)
            if checkpoints.frames()[1] < longest:
                break
        assert checkpoints.frames()[1] < longest, "the WAL did not start over once the reader had ended"
    finally:
        reader.close()
        await store.close()


@pytest.mark.sqlite_only
async def test_a_wal_index_of_another_layout_leaves_checkpoints_to_sqlite(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Should SQLite ever lay its WAL's index out differently, the writer does not read it: SQLite's own
    autocheckpoint copies the WAL back, inside the commits, as before."""
    monkeypatch.setattr(sqlite_store, "WAL_INDEX_VERSION", 1)
    path = tmp_path / "aetr.db"
    store = SqliteStore(create_async_engine(f"sqlite+aiosqlite:///{path}"), "full")
    await upgrade_engine(store.engine)
    try:
        coordinator, _ = await coordinator_without_http(store, "two", 2)
        await coordinator.start_run("two", 0, None)
        assert store._writer is not None and store._writer._checkpoints is None
        assert store._writer.conn.execute("PRAGMA wal_autocheckpoint").fetchone() == (CHECKPOINT_FRAMES,)
    finally:
        await store.close()
