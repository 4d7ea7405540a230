"""Deleting ended runs: one by the API, by age (purge), and by the retention loop; nothing of them is left."""

from __future__ import annotations

import asyncio
import contextlib
import re
import sqlite3
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, or_, select

from aetr.engine.retention import RetentionLoop, purge
from aetr.store import open_store
from aetr.store.tables import metadata
from aetr.testing import StepService, callback, never
from tests.integration.conftest import Server, running_server

# Every table, and the columns of it that hold a run's or a node's id. A table added later fails
# test_deleting_a_run_leaves_no_row_of_it_in_any_table until it is listed here.
KEYED_BY_RUN: dict[str, tuple[str, ...]] = {
    "run_nodes": ("id", "root_id"),
    "run_counters": ("node_id",),
    "work": ("node_id", "root_id"),
    "events": ("root_id", "node_id"),
    "step_slots": ("holder_id",),
}
# A schedule's record of the due times it claimed names their runs, and is kept on purpose: it is what says the
# due time was started (so it is never started again), and its run then shows as `deleted` (docs/behaviour.md).
KEPT_ON_PURPOSE = {"schedule_runs": ("run_id",)}
NOT_KEYED_BY_RUN = {"steps", "step_children", "settings", "schedules"}
UNREACHABLE = "http://127.0.0.1:9/hook"  # nothing listens on port 9: a notification to it is tried again and again


def api(svc: StepService, name: str, **kw: Any) -> dict[str, Any]:
    return {"name": name, "kind": "api", "url": svc.url(f"/{name}"), **kw}


def node_ids(run: dict[str, Any]) -> set[str]:
    found, stack = set(), [run]
    while stack:
        node = stack.pop()
        found.add(node["id"])
        stack.extend(node["children"])
    return found


async def rows_of(aetr: Server, ids: set[str]) -> dict[str, int]:
    """The rows of every table that name one of `ids` (a run's and its nodes' ids), by table."""
    counts = {}
    async with aetr.engine.store.engine.connect() as conn:
        for table in metadata.sorted_tables:
            if table.name in NOT_KEYED_BY_RUN:
                continue
            columns = KEYED_BY_RUN.get(table.name) or KEPT_ON_PURPOSE.get(table.name)
            assert columns is not None, f"table {table.name}: say whether its rows belong to runs (KEYED_BY_RUN)"
            where = or_(*(table.c[name].in_(ids) for name in columns))
            counts[table.name] = int((await conn.execute(select(func.count()).select_from(table).where(where)))
                                     .scalar() or 0)
    return counts


async def eventually(check: Callable[[], Awaitable[bool]], what: str, timeout: float = 30.0) -> None:  # noqa: ASYNC109
    """Poll `check` until it holds; fail saying `what` did not happen within `timeout` seconds."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not await check():
        assert asyncio.get_running_loop().time() < deadline, f"{what} within {timeout} s"
        await asyncio.sleep(0.1)


async def deleted_metric(aetr: Server) -> dict[str, float]:
    status, text = await aetr.call("GET", "/metrics")
    assert status == 200
    found = re.findall(r'^aetr_runs_deleted_total\{how="(\w+)"\} (\S+)$', text.decode(), re.MULTILINE)
    return {how: float(value) for how, value in found}


async def test_deleting_a_run_leaves_no_row_of_it_in_any_table(aetr: Server, steps_service: StepService) -> None:
    svc = steps_service
    svc.route("/a", callback(lambda x: {"a": x}))
    svc.route("/b", never())
    await aetr.put_step({"name": "pair", "kind": "parallel", "children": [
        {"step": api(svc, "a")}, {"step": api(svc, "b")}]})
    status, body = await aetr.call("POST", "/api/v1/runs", {"step": "pair", "input": {"n": 1},
                                                            "notify": UNREACHABLE})
    assert status == 201, body
    run_id = body["id"]
    other = await aetr.start("pair", {"n": 2})  # a neighbour that must keep every row
    await svc.wait_for_calls("/b", 2)

    status, body = await aetr.call("DELETE", f"/api/v1/runs/{run_id}")
    assert status == 409 and "cancel it first" in body["detail"], body
    assert (await aetr.call("GET", f"/api/v1/runs/{run_id}"))[0] == 200  # nothing changed

    assert (await aetr.call("POST", f"/api/v1/runs/{run_id}/cancel"))[0] == 200
    run = await aetr.wait_run(run_id)
    ids = node_ids(run)
    before = await rows_of(aetr, ids)
    assert before["run_nodes"] == 3 and before["events"] > 0 and before["work"] > 0, before  # its notification

    assert (await aetr.call("DELETE", f"/api/v1/runs/{run_id}"))[0] == 204
    assert await rows_of(aetr, ids) == dict.fromkeys(before, 0)
    assert (await aetr.call("GET", f"/api/v1/runs/{run_id}"))[0] == 404
    assert (await aetr.call("GET", f"/api/v1/runs/{run_id}/events"))[0] == 404
    _, page = await aetr.call("GET", "/api/v1/runs")
    assert [r["id"] for r in page["runs"]] == [other]
    status, body = await aetr.call("DELETE", f"/api/v1/runs/{run_id}")
    assert status == 404 and body["detail"] == f"no run with id '{run_id}'", body
    assert (await aetr.call("DELETE", "/api/v1/runs/not-a-uuid"))[0] == 404

    other_rows = await rows_of(aetr, node_ids((await aetr.call("GET", f"/api/v1/runs/{other}"))[1]))
    assert other_rows["run_nodes"] == 3 and other_rows["events"] > 0, other_rows
    assert (await deleted_metric(aetr)).get("api", 0) >= 1


async def test_purge_deletes_only_the_runs_that_ended_before_the_age_given(aetr: Server,
                                                                           steps_service: StepService) -> None:
    steps_service.route("/slow", never())
    await aetr.put_step({"name": "quick", "kind": "sequential"})
    await aetr.put_step(api(steps_service, "slow"))
    old = [await aetr.start("quick", i) for i in range(5)]
    status, body = await aetr.call("POST", "/api/v1/runs", {"step": "quick", "notify": UNREACHABLE})
    assert status == 201, body
    old_notifying = body["id"]
    ended = max([datetime.fromisoformat((await aetr.wait_run(r))["completed_at"]) for r in old]
                + [datetime.fromisoformat((await aetr.wait_run(old_notifying))["completed_at"])])
    await asyncio.sleep(1.0)  # the age that tells the old runs from the new ones: a second, not a wait for hope
    new = [await aetr.start("quick", i) for i in range(3)]
    running = await aetr.start("slow")
    for run_id in new:
        await aetr.wait_run(run_id)

    for bad in ({"older_than_s": -1}, {"older_than_s": "1d"}, {"older_than_s": False}, {},
                {"older_than_s": 1, "extra": 1}, {"older_than_s": 1e300}, {"older_than_s": None}, [1]):
        status, body = await aetr.call("POST", "/api/v1/retention/purge", bad)
        assert status == 422, (bad, body)
    _, page = await aetr.call("GET", "/api/v1/runs?limit=500")
    assert len(page["runs"]) == 10  # nothing was deleted by the refused requests

    # Half a second after the old runs' last end: they ended before it, the new ones a second after it.
    age = (datetime.now(ended.tzinfo) - ended).total_seconds() - 0.5
    status, body = await aetr.call("POST", "/api/v1/retention/purge", {"older_than_s": age})
    assert status == 200 and body == {"deleted": 5}, body
    _, page = await aetr.call("GET", "/api/v1/runs?limit=500")
    # The notification of one old run is still being tried: it is kept until that is done or given up.
    assert {r["id"] for r in page["runs"]} == {*new, running, old_notifying}
    for run_id in old:
        assert (await aetr.call("GET", f"/api/v1/runs/{run_id}"))[0] == 404
    status, body = await aetr.call("POST", "/api/v1/retention/purge", {"older_than_s": 0})
    assert status == 200 and body == {"deleted": 3}, body  # every ended run; the running one stays
    assert (await aetr.call("GET", f"/api/v1/runs/{running}"))[0] == 200
    assert (await deleted_metric(aetr)).get("purge", 0) >= 8


async def test_deleting_goes_at_full_pace_when_idle_and_a_batch_per_busy_pause_while_work_runs(
        aetr: Server) -> None:
    per_round = 20
    await aetr.put_step({"name": "quick", "kind": "sequential"})
    store = aetr.engine.store

    async def ended_runs() -> datetime:
        for run_id in [await aetr.start("quick", i) for i in range(per_round)]:
            await aetr.wait_run(run_id)
        return datetime.now(UTC)

    async def timed_purge(ended_before: datetime, batch: int, pause_s: float,
                          busy_pause_s: float) -> tuple[int, float]:
        started = time.monotonic()
        deleted = await purge(store, ended_before, "purge", batch=batch, pause_s=pause_s, busy_pause_s=busy_pause_s)
        return deleted, time.monotonic() - started

    # Nothing runs: a run at a time, 0.1 s apart, for 2 s, through the worker's idle polls of due work (one a
    # second), which are no running work: never a busy pause.
    quiet = await timed_purge(await ended_runs(), batch=1, pause_s=0.1, busy_pause_s=1.0)
    assert quiet[0] == per_round
    assert quiet[1] < per_round * 0.1 + 0.8, quiet

    # Runs keep starting (each start an event) while the purge goes: it waits busy_pause_s after each batch.
    batch, busy_pause_s = 5, 0.4
    ended_before = await ended_runs()
    stop = asyncio.Event()

    async def keep_starting() -> None:
        while not stop.is_set():
            await aetr.start("quick")

    load = asyncio.create_task(keep_starting())
    try:
        busy = await timed_purge(ended_before, batch=batch, pause_s=0.0, busy_pause_s=busy_pause_s)
    finally:
        stop.set()
        await load
    assert busy[0] == per_round  # the runs that ended meanwhile are not older than the age given
    # A pause after every full batch but perhaps the first, which may end before the first start does.
    assert busy[1] >= (per_round // batch - 1) * busy_pause_s, busy


async def test_the_retention_loop_deletes_a_run_once_it_is_due(database_url: str) -> None:
    keep_s = 2.0
    async with running_server(database_url, retention_days=keep_s / 86_400) as aetr:
        await aetr.put_step({"name": "quick", "kind": "sequential"})
        counted = (await deleted_metric(aetr)).get("retention", 0)
        run_id = await aetr.start("quick")
        ended = datetime.fromisoformat((await aetr.wait_run(run_id))["completed_at"])

        async def gone() -> bool:
            return (await aetr.call("GET", f"/api/v1/runs/{run_id}"))[0] == 404

        # Due keep_s after its end; the loop looks every TICK_S (10 s): gone well within a minute.
        await eventually(gone, "the run was not deleted", timeout=45.0)
        assert (datetime.now(ended.tzinfo) - ended).total_seconds() >= keep_s
        assert (await deleted_metric(aetr)).get("retention") == counted + 1


def checkpointed_size(path: Path) -> int:
    """The database file's size once every page written to its write-ahead log is copied into it."""
    with contextlib.closing(sqlite3.connect(path, timeout=10)) as conn:
        busy, _, _ = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        assert busy == 0, "another connection kept the checkpoint from finishing"
    return path.stat().st_size


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_the_sqlite_file_stops_growing_under_steady_load_with_retention_on(database_url: str) -> None:
    path = Path(database_url.removeprefix("sqlite:///"))
    async with running_server(database_url, retention_days=1 / 86_400) as aetr:
        # Look every half second rather than every TICK_S, so that rounds follow each other quickly.
        assert aetr.engine.retention is not None
        await aetr.engine.retention.stop()
        aetr.engine.retention = RetentionLoop(aetr.engine.store, 1 / 86_400, tick_s=0.5)
        aetr.engine.retention.start()
        await aetr.put_step({"name": "quick", "kind": "sequential"})
        payload = "x" * 4_000
        sizes = []
        for _ in range(8):
            for batch in range(4):
                await asyncio.gather(*(aetr.start("quick", {"p": payload, "i": i})
                                       for i in range(25 * batch, 25 * batch + 25)))

            async def emptied() -> bool:
                _, page = await aetr.call("GET", "/api/v1/runs?limit=1")
                return not page["runs"]

            await eventually(emptied, "the round's runs were not deleted")
            sizes.append(await asyncio.to_thread(checkpointed_size, path))
        # A round writes 100 runs of 4 kB (400 kB): kept, the file would grow by that each round.
        assert sizes[-1] <= sizes[2] + 64 * 1024, sizes


@pytest.mark.postgres
async def test_only_one_process_deletes_by_retention_on_postgresql(pg_url: str) -> None:
    first, second = open_store(pg_url), open_store(pg_url)
    try:
        assert await first.retention.hold_lock()
        assert not await second.retention.hold_lock()
        assert await first.retention.hold_lock()  # kept from one look to the next
        await first.retention.release_lock()
        assert await second.retention.hold_lock()
        assert not await first.retention.hold_lock()
    finally:
        await first.close()
        await second.close()
