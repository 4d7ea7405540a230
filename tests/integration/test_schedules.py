"""Schedules on both databases: the API's checks and answers, and due times firing under a controlled clock."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

from aetr.domain.schedules import run_key
from aetr.engine.schedules import PENDING_GRACE_S, ScheduleTicker
from tests.integration.conftest import Server, running_server

START = datetime(2026, 5, 1, 10, 0, 30, tzinfo=UTC)


class Clock:
    """A time tests move on by hand."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


async def controlled(aetr: Server) -> Clock:
    """Stop the server's own ticker (the test ticks by hand) and give schedules a clock the test moves."""
    await aetr.engine.schedules.stop()
    clock = Clock(START)
    aetr.engine.schedules.clock = clock
    await aetr.put_step({"name": "nightly", "kind": "wait", "signal": True, "timeout_s": 600})
    return clock


async def put(aetr: Server, name: str, body: dict[str, Any]) -> tuple[int, Any]:
    return await aetr.call("PUT", f"/api/v1/schedules/{name}", body)


async def runs_of(aetr: Server, step: str = "nightly") -> list[dict[str, Any]]:
    status, body = await aetr.call("GET", f"/api/v1/runs?step={step}&limit=500")
    assert status == 200, body
    runs: list[dict[str, Any]] = body["runs"]
    return runs


async def test_a_schedule_is_created_read_listed_replaced_and_deleted(aetr: Server) -> None:
    await controlled(aetr)
    status, body = await put(aetr, "every-hour", {"step": "nightly", "cron": "0  * * * *", "input": {"n": 1}})
    assert status == 201, body
    assert body["cron"] == "0 * * * *" and body["timezone"] == "UTC" and body["enabled"] is True
    assert body["input"] == {"n": 1} and body["notify"] is None and body["last_runs"] == []
    assert body["next_run_at"] == "2026-05-01T11:00:00+00:00"

    status, body = await put(aetr, "every-hour", {**body, "timezone": "Asia/Kolkata", "enabled": True})
    assert status == 200, body
    assert body["next_run_at"] == "2026-05-01T10:30:00+00:00"  # 16:00 in Kolkata (UTC+5:30)

    status, listed = await aetr.call("GET", "/api/v1/schedules")
    assert status == 200 and [s["name"] for s in listed] == ["every-hour"]
    assert (await aetr.call("GET", "/api/v1/schedules/every-hour"))[1] == listed[0]

    status, _ = await aetr.call("DELETE", "/api/v1/schedules/every-hour")
    assert status == 204
    for method in ("GET", "DELETE"):
        status, body = await aetr.call(method, "/api/v1/schedules/every-hour")
        assert status == 404 and body["detail"] == "no schedule named 'every-hour'"


async def test_bad_schedules_are_refused_with_what_is_wrong_and_nothing_is_stored(aetr: Server) -> None:
    await controlled(aetr)
    good = {"step": "nightly", "cron": "*/5 * * * *"}
    cases = [
        ({**good, "cron": "*/5 * * *"}, "cron: '*/5 * * *' has 4 fields; write five"),
        ({**good, "cron": "0 25 * * *"}, "cron: '0 25 * * *' is not a valid cron expression"),
        ({**good, "cron": "0 0 31 2 *"}, "cron: '0 0 31 2 *' never comes"),
        ({**good, "timezone": "Europe/Atlantis"}, "timezone: 'Europe/Atlantis' is not a known IANA time zone"),
        ({**good, "step": "nope"}, "step: no step named (or with id) 'nope'"),
        ({**good, "notify": "ftp://example.com/x"}, "notify: must be an absolute http:// or https:// URL"),
        ({**good, "notify": "http://exa mple.com/"}, "notify: must not contain spaces"),
        ({**good, "name": "other"}, "name: 'other' in the body differs from 'bad' in the path"),
        ({**good, "every": "day"}, "every: is not a known field"),
    ]
    for body, says in cases:
        status, answer = await put(aetr, "bad", body)
        assert status == 422, (body, answer)
        assert says in answer["detail"], (body, answer)
    assert (await aetr.call("GET", "/api/v1/schedules"))[1] == []


async def test_a_notify_url_must_be_an_allowed_host_when_an_allow_list_is_set(database_url: str) -> None:
    from aetr.domain.hosts import AllowedHosts

    async with running_server(database_url, allowed_step_hosts=AllowedHosts.parse("hooks.example.com")) as aetr:
        await controlled(aetr)
        status, body = await put(aetr, "n", {"step": "nightly", "cron": "* * * * *",
                                             "notify": "https://elsewhere.example.org/hook"})
        assert status == 422 and "notify: 'elsewhere.example.org' is not listed" in body["detail"]
        status, body = await put(aetr, "n", {"step": "nightly", "cron": "* * * * *",
                                             "notify": "https://hooks.example.com/hook"})
        assert status == 201 and body["notify"] == "https://hooks.example.com/hook"


async def test_each_due_minute_starts_one_run_and_shows_it_in_last_runs(aetr: Server) -> None:
    clock = await controlled(aetr)
    ticker = aetr.engine.schedules
    await put(aetr, "minutely", {"step": "nightly", "cron": "* * * * *", "input": {"from": "schedule"}})
    assert await ticker.tick() == 0  # 10:00:30: next due at 10:01
    for minute in (1, 2, 3):
        clock.now = START.replace(minute=minute, second=2)
        assert await ticker.tick() == 1
        assert await ticker.tick() == 0  # looking again within the minute starts nothing
    runs = await runs_of(aetr)
    assert len(runs) == 3 and all(r["input"] == {"from": "schedule"} for r in runs)
    _, body = await aetr.call("GET", "/api/v1/schedules/minutely")
    assert body["next_run_at"] == "2026-05-01T10:04:00+00:00"
    assert [r["due_at"] for r in body["last_runs"]] == [f"2026-05-01T10:0{m}:00+00:00" for m in (3, 2, 1)]
    assert {r["id"] for r in body["last_runs"]} == {r["id"] for r in runs}
    assert all(r["state"] == "executing" for r in body["last_runs"])


async def test_after_downtime_one_catch_up_run_starts_for_the_latest_missed_time(aetr: Server) -> None:
    clock = await controlled(aetr)
    await put(aetr, "minutely", {"step": "nightly", "cron": "* * * * *"})
    clock.now = START + timedelta(hours=3)  # no process looked for three hours: 180 due times missed
    assert await aetr.engine.schedules.tick() == 1
    assert await aetr.engine.schedules.tick() == 0
    assert len(await runs_of(aetr)) == 1
    _, body = await aetr.call("GET", "/api/v1/schedules/minutely")
    assert [r["due_at"] for r in body["last_runs"]] == ["2026-05-01T13:00:00+00:00"]
    assert body["next_run_at"] == "2026-05-01T13:01:00+00:00"


async def test_a_paused_schedule_starts_nothing_and_resuming_does_not_back_fill(aetr: Server) -> None:
    clock = await controlled(aetr)
    _, body = await put(aetr, "minutely", {"step": "nightly", "cron": "* * * * *"})
    _, body = await put(aetr, "minutely", {**body, "enabled": False})
    assert body["enabled"] is False and body["next_run_at"] is None
    clock.now = START + timedelta(minutes=30)
    assert await aetr.engine.schedules.tick() == 0
    _, body = await put(aetr, "minutely", {**body, "enabled": True})
    assert body["next_run_at"] == "2026-05-01T10:31:00+00:00"
    assert await aetr.engine.schedules.tick() == 0
    assert await runs_of(aetr) == []
    clock.now = START + timedelta(minutes=31)
    assert await aetr.engine.schedules.tick() == 1


async def test_tickers_looking_at_once_start_each_due_time_once(aetr: Server) -> None:
    clock = await controlled(aetr)
    for i in range(5):
        await put(aetr, f"s{i}", {"step": "nightly", "cron": "* * * * *"})
    tickers = [ScheduleTicker(aetr.engine.store, aetr.engine.coordinator, clock=clock) for _ in range(4)]
    for minute in (1, 2):
        clock.now = START.replace(minute=minute, second=1)
        started = await asyncio.gather(*(t.tick() for t in tickers))
        assert sum(started) == 5
    assert len(await runs_of(aetr)) == 10


async def test_a_claim_whose_process_died_before_the_run_started_is_started_once_by_another(aetr: Server) -> None:
    clock = await controlled(aetr)
    store = aetr.engine.store.schedules
    await put(aetr, "minutely", {"step": "nightly", "cron": "* * * * *"})
    clock.now = START.replace(minute=1, second=1)
    # A process claims 10:01 and is killed before it starts the run.
    schedule = (await store.due(clock.now, 10))[0]
    assert await store.claim(schedule, clock.now.replace(second=0), START.replace(minute=2, second=0), clock.now)
    _, body = await aetr.call("GET", "/api/v1/schedules/minutely")
    assert body["last_runs"][0]["state"] == "starting" and body["last_runs"][0]["id"] is None
    assert await aetr.engine.schedules.tick() == 0  # within the claim's grace: its own process may still start it
    clock.now += timedelta(seconds=PENDING_GRACE_S)
    ticker_b = ScheduleTicker(aetr.engine.store, aetr.engine.coordinator, clock=clock)
    assert sum(await asyncio.gather(aetr.engine.schedules.tick(), ticker_b.tick())) == 1
    runs = await runs_of(aetr)
    assert len(runs) == 1
    _, body = await aetr.call("GET", "/api/v1/schedules/minutely")
    assert body["last_runs"][0]["id"] == runs[0]["id"] and body["last_runs"][0]["state"] == "executing"


async def test_a_claim_whose_run_was_started_before_its_process_died_is_not_started_again(aetr: Server) -> None:
    clock = await controlled(aetr)
    store = aetr.engine.store.schedules
    _, body = await put(aetr, "minutely", {"step": "nightly", "cron": "* * * * *"})
    clock.now = START.replace(minute=1, second=1)
    due = START.replace(minute=1, second=0)
    schedule = (await store.due(clock.now, 10))[0]
    assert await store.claim(schedule, due, due + timedelta(minutes=1), clock.now)
    # Killed after its run's commit, before recording it.
    started = await aetr.engine.coordinator.start_run("nightly", None, run_key(schedule.id, due))
    clock.now += timedelta(seconds=PENDING_GRACE_S + 1)
    assert await aetr.engine.schedules.tick() == 0
    runs = await runs_of(aetr)
    assert [r["id"] for r in runs] == [started.run_id]
    _, body = await aetr.call("GET", "/api/v1/schedules/minutely")
    assert body["last_runs"][0]["id"] == started.run_id


async def test_a_due_time_whose_step_was_deleted_is_recorded_as_refused(aetr: Server) -> None:
    clock = await controlled(aetr)
    await aetr.put_step({"name": "gone", "kind": "wait", "seconds": 1})
    await put(aetr, "minutely", {"step": "gone", "cron": "* * * * *"})
    assert (await aetr.call("DELETE", "/api/v1/steps/gone"))[0] == 204
    clock.now = START.replace(minute=1)
    assert await aetr.engine.schedules.tick() == 0
    _, body = await aetr.call("GET", "/api/v1/schedules/minutely")
    assert body["last_runs"][0]["state"] == "refused" and "'gone'" in body["last_runs"][0]["error"]
    assert body["next_run_at"] == "2026-05-01T10:02:00+00:00"


async def test_the_server_ticks_by_itself_and_reports_the_lag(database_url: str) -> None:
    async with running_server(database_url, schedule_tick_s=0.05) as aetr:
        await aetr.put_step({"name": "nightly", "kind": "wait", "signal": True, "timeout_s": 600})
        clock = Clock(datetime.now(UTC))
        aetr.engine.schedules.clock = clock
        await put(aetr, "minutely", {"step": "nightly", "cron": "* * * * *"})
        clock.now = clock.now.replace(second=0, microsecond=0) + timedelta(minutes=1, seconds=2)
        deadline = asyncio.get_running_loop().time() + 10
        while not await runs_of(aetr):
            assert asyncio.get_running_loop().time() < deadline, "the due minute started no run within 10 s"
            await asyncio.sleep(0.05)
        status, metrics = await aetr.call("GET", "/metrics")
        assert status == 200 and b"aetr_schedule_lag_seconds_bucket" in metrics
