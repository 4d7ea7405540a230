"""Schedules with real `aetr` processes: three sharing one PostgreSQL, one killed, every due time started once;
and the CLI's `apply` of schedules and `aetr schedules` commands.

The processes' schedules run on a fast clock (AETR_TEST_SCHEDULE_CLOCK: a minute of schedule time every
CLOCK_RATE-th of a real minute, the same for every process), so that minute-by-minute cron expressions come
due every couple of seconds rather than every minute; the claims, the races between processes and the kill
are all real.
"""

from __future__ import annotations

import asyncio
import time
from datetime import datetime, timedelta
from pathlib import Path

import aiohttp
import asyncpg
import pytest

from tests.e2e.harness import Api, Launcher, cli

CLOCK_RATE = 30  # schedule minutes per real minute: one `* * * * *` due time every 2 s
PROCESSES = 3
SCHEDULES = 8
DUE_BEFORE_KILL = 4  # due times each schedule has started when a process is killed
DUE_AFTER_KILL = 5  # and after it
OVERALL_S = 120.0
POLL_S = 0.2


def minutes(first: datetime, end: datetime) -> list[datetime]:
    """Every whole minute from `first` up to (not including) `end`."""
    found = []
    while first < end:
        found.append(first)
        first += timedelta(minutes=1)
    return found


@pytest.mark.parametrize("database_url", [pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True)
async def test_three_processes_start_every_due_time_once_while_one_is_killed(
        launcher: Launcher, database_url: str, http: aiohttp.ClientSession) -> None:
    env = {"AETR_TEST_SCHEDULE_CLOCK": f"{time.time():.3f}*{CLOCK_RATE}", "AETR_SCHEDULE_TICK_S": "0.1",
           "AETR_DB_POOL_SIZE": "8"}
    servers = list(await asyncio.gather(*(launcher.serve(database_url, env=env) for _ in range(PROCESSES))))
    apis = [Api(http, s.url) for s in servers]
    await apis[0].put_step({"name": "tick", "kind": "wait", "signal": True, "timeout_s": 3600})
    first: dict[str, datetime] = {}
    for i in range(SCHEDULES):
        status, body = await apis[i % PROCESSES].call("PUT", f"/api/v1/schedules/s{i}",
                                                      {"step": "tick", "cron": "* * * * *", "input": {"i": i}})
        assert status == 201, body
        first[body["name"]] = datetime.fromisoformat(body["next_run_at"])
    deadline = time.monotonic() + OVERALL_S
    db = await asyncpg.connect(database_url)
    try:
        async def started() -> dict[str, set[datetime]]:
            """Each schedule's due times that have a run, read from the runs' idempotency keys."""
            rows = await db.fetch("SELECT s.name, r.idempotency_key FROM run_nodes r JOIN schedules s"
                                  " ON r.idempotency_key LIKE 'schedule:' || s.id || ':%' WHERE r.parent_id IS NULL")
            found: dict[str, set[datetime]] = {name: set() for name in first}
            for name, key in rows:
                found[name].add(datetime.fromisoformat(key.split(":", 2)[2]))  # schedule:ID:DUE
            return found

        async def until_each_has(count: int) -> None:
            while min(len(v) for v in (await started()).values()) < count:
                assert time.monotonic() < deadline, f"schedules did not reach {count} runs: {await started()}"
                await asyncio.sleep(POLL_S)

        await until_each_has(DUE_BEFORE_KILL)
        servers[1].kill()
        await until_each_has(DUE_BEFORE_KILL + DUE_AFTER_KILL)

        # Every due time before each schedule's next one has a run, started by a survivor if the victim died
        # holding its claim; wait for those (a claim's run starts within moments), then compare.
        ends: dict[str, datetime] = {}
        for name in first:
            status, body = await apis[0].call("GET", f"/api/v1/schedules/{name}")
            assert status == 200, body
            ends[name] = datetime.fromisoformat(body["next_run_at"])
        while True:
            runs = await started()
            expected = {name: set(minutes(first[name], ends[name])) for name in first}
            got = {name: {due for due in runs[name] if due < ends[name]} for name in first}
            if got == expected or time.monotonic() > deadline:
                break
            await asyncio.sleep(POLL_S)
        assert got == expected, {n: (sorted(expected[n] - got[n]), sorted(got[n] - expected[n])) for n in first}
        # No run of the step but those of the schedules' due times: nothing was started twice under other keys.
        total = await db.fetchval("SELECT count(*) FROM run_nodes WHERE parent_id IS NULL AND step_name = 'tick'")
        assert total == sum(len(v) for v in runs.values())
    finally:
        await db.close()


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_schedules_are_applied_from_step_files_listed_paused_resumed_and_deleted(
        launcher: Launcher, database_url: str, tmp_path: Path) -> None:
    server = await launcher.serve(database_url)
    flow = tmp_path / "nightly.yaml"
    flow.write_text("name: report\nkind: wait\nseconds: 1\n---\n"
                    "kind: schedule\nname: nightly-report\nstep: report\ncron: '30 2 * * *'\n"
                    "timezone: Europe/Paris\ninput: {day: yesterday}\n")
    applied = await cli("--url", server.url, "apply", "-f", str(flow))
    assert applied.code == 0, applied
    said = " ".join(applied.stdout.split())
    assert "created report version 1 created schedule nightly-report next run" in said, applied

    listed = await cli("--url", server.url, "schedules", "list")
    assert listed.code == 0, listed
    line = next(row for row in listed.stdout.splitlines() if "nightly-report" in row)
    assert "report" in line and "30 2 * * *" in line and "Europe/Paris" in line and "yes" in line, listed

    paused = await cli("--url", server.url, "schedules", "pause", "nightly-report")
    assert paused.code == 0 and "paused" in paused.stdout, paused
    line = next(row for row in (await cli("--url", server.url, "schedules", "list")).stdout.splitlines()
                if "nightly-report" in row)
    assert "paused" in line and "yes" not in line
    resumed = await cli("--url", server.url, "schedules", "resume", "nightly-report")
    assert resumed.code == 0 and "resumed, next run" in resumed.stdout, resumed

    again = await cli("--url", server.url, "apply", "-f", str(flow))
    assert "replaced schedule nightly-report" in " ".join(again.stdout.split()), again

    bad = tmp_path / "bad.yaml"
    bad.write_text("kind: schedule\nname: broken\nstep: report\ncron: '61 * * * *'\n")
    refused = await cli("--url", server.url, "apply", "-f", str(bad))
    assert refused.code == 2, refused
    assert "schedule 'broken': cron: '61 * * * *' is not a valid cron expression" in " ".join(refused.stderr.split())

    deleted = await cli("--url", server.url, "schedules", "delete", "nightly-report")
    assert deleted.code == 0, deleted
    gone = await cli("--url", server.url, "schedules", "delete", "nightly-report")
    assert gone.code == 2 and "no schedule named 'nightly-report' (HTTP 404)" in gone.stderr, gone
