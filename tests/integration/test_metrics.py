"""/metrics: runs, attempts and callbacks counted by step and outcome, the oldest due work, the database pools."""

from __future__ import annotations

import asyncio
import logging

import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from aetr.store import Unavailable
from aetr.testing import StepService, callback, fail, never, sequence, status
from tests.integration.conftest import Server

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(aetr: Server) -> Samples:
    """Every sample /metrics shows, by name and labels."""
    async with aetr.http.get(f"{aetr.base_url}/metrics") as resp:
        assert resp.status == 200
        text = await resp.text()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def grew(before: Samples, after: Samples, name: str, **labels: str) -> float:
    """How much one sample went up between two scrapes (the counters are the process's, shared by tests)."""
    key = (name, frozenset(labels.items()))
    return after.get(key, 0.0) - before.get(key, 0.0)


def api(svc: StepService, name: str, **fields: object) -> dict[str, object]:
    return {"name": name, "kind": "api", "url": svc.url(f"/{name}"), "retry": {"max_attempts": 1}, **fields}


async def timer_left_due(aetr: Server, age_s: float) -> float:
    """Stop the server's worker, start a run of a short wait, and wait until its timer has been due `age_s`
    seconds without a process to end it: the age /metrics then shows."""
    await aetr.engine.worker.stop()
    await aetr.put_step({"name": "m-pause", "kind": "wait", "seconds": 0.1})
    await aetr.start("m-pause")
    deadline = asyncio.get_running_loop().time() + 10
    while (age := (await scrape(aetr))[("aetr_oldest_due_work_age_seconds", frozenset())]) < age_s:
        assert asyncio.get_running_loop().time() < deadline, f"the age stayed at {age}"
        await asyncio.sleep(0.05)  # polling /metrics until the timer has waited long enough
    return age


async def test_runs_attempts_and_callbacks_are_counted_by_step_and_outcome(
        aetr: Server, steps_service: StepService) -> None:
    steps_service.route("/m-ok", callback(lambda value: {"got": value}))
    steps_service.route("/m-bad", fail("the disk is full"))
    steps_service.route("/m-hang", never())
    steps_service.route("/m-flaky", sequence(status(503), callback(lambda value: value)))
    await aetr.put_step(api(steps_service, "m-ok"))
    await aetr.put_step(api(steps_service, "m-bad"))
    await aetr.put_step(api(steps_service, "m-hang"))
    await aetr.put_step(api(steps_service, "m-slow", timeout_s=0.3, url=steps_service.url("/m-hang")))
    await aetr.put_step(api(steps_service, "m-flaky", retry={"max_attempts": 2, "backoff_s": 0.01}))
    before = await scrape(aetr)

    ok, bad, flaky, slow = [await aetr.start(step, 1) for step in ("m-ok", "m-bad", "m-flaky", "m-slow")]
    hang = await aetr.start("m-hang")
    assert (await aetr.wait_run(ok))["state"] == "complete"
    assert (await aetr.wait_run(bad))["state"] == "error"
    assert (await aetr.wait_run(flaky))["state"] == "complete"
    assert (await aetr.wait_run(slow))["state"] == "error"
    await steps_service.wait_for_calls("/m-hang", 2)  # m-slow's call and m-hang's
    status_code, _ = await aetr.call("POST", f"/api/v1/runs/{hang}/cancel")
    assert status_code == 200
    # The step says it again: the second report of the same output is a duplicate.
    again = steps_service.calls("/m-ok")[0].callback_url
    assert again is not None
    async with aetr.http.post(again, data=orjson.dumps({"got": 1}),
                              headers={"Content-Type": "application/json"}) as resp:
        assert resp.status == 200 and (await resp.json())["duplicate"] is True
    after = await scrape(aetr)

    for step in ("m-ok", "m-bad", "m-hang", "m-flaky", "m-slow"):
        assert grew(before, after, "aetr_runs_started_total", step=step) == 1, step
    assert grew(before, after, "aetr_runs_ended_total", step="m-ok", state="complete") == 1
    assert grew(before, after, "aetr_runs_ended_total", step="m-flaky", state="complete") == 1
    assert grew(before, after, "aetr_runs_ended_total", step="m-bad", state="error") == 1
    assert grew(before, after, "aetr_runs_ended_total", step="m-slow", state="error") == 1
    assert grew(before, after, "aetr_runs_ended_total", step="m-hang", state="cancelled") == 1

    expected = {("m-ok", "succeeded"): 1, ("m-bad", "failed"): 1, ("m-hang", "cancelled"): 1,
                ("m-slow", "timed_out"): 1, ("m-flaky", "failed"): 1, ("m-flaky", "succeeded"): 1}
    for (step, outcome), n in expected.items():
        assert grew(before, after, "aetr_attempts_total", step=step, outcome=outcome) == n, (step, outcome)
        # One process made every call: each attempt is timed, from its call to its outcome.
        assert grew(before, after, "aetr_attempt_duration_seconds_count", step=step, outcome=outcome) == n
    assert grew(before, after, "aetr_attempts_total", step="m-ok", outcome="failed") == 0
    slow_s = grew(before, after, "aetr_attempt_duration_seconds_sum", step="m-slow", outcome="timed_out")
    # The deadline is 0.3 s from the commit that queued the call; the call leaves a moment after it.
    assert 0.15 <= slow_s < 10
    assert grew(before, after, "aetr_attempt_duration_seconds_bucket", step="m-slow", outcome="timed_out",
                le="0.1") == 0

    assert grew(before, after, "aetr_step_reports_total", source="callback", outcome="accepted") == 2  # ok, flaky
    assert grew(before, after, "aetr_step_reports_total", source="callback", outcome="duplicate") == 1
    assert grew(before, after, "aetr_step_reports_total", source="callback.fail", outcome="accepted") == 1

    # Every call by its answer: m-flaky's first got a 503; the others, m-flaky's second included, a 2xx (m-hang's
    # answer is counted once the server has read it: scraped until it shows, or the deadline).
    deadline = asyncio.get_running_loop().time() + 10
    while grew(before, after, "aetr_step_calls_total", result="2xx") < 5:
        assert asyncio.get_running_loop().time() < deadline, grew(before, after, "aetr_step_calls_total", result="2xx")
        await asyncio.sleep(0.02)
        after = await scrape(aetr)
    assert grew(before, after, "aetr_step_calls_total", result="2xx") == 5
    assert grew(before, after, "aetr_step_calls_total", result="5xx") == 1
    assert grew(before, after, "aetr_step_calls_total", result="unreachable") == 0


async def test_pool_gauges_show_the_connections_each_pool_may_open_and_uses(aetr: Server) -> None:
    samples = await scrape(aetr)
    pools = {dict(labels)["pool"]: value for (name, labels), value in samples.items() if name == "aetr_db_pool_size"}
    expected = {"sqlalchemy", "events"} if aetr.engine.store.dialect == "postgresql" else {"sqlalchemy"}
    assert pools.keys() == expected
    for pool, size in pools.items():
        in_use = samples[("aetr_db_pool_in_use", frozenset({("pool", pool)}))]
        assert size >= 1 and 0 <= in_use <= size, (pool, size, in_use)


async def test_oldest_due_work_age_grows_while_no_process_claims_due_work(aetr: Server) -> None:
    samples = await scrape(aetr)
    assert samples[("aetr_oldest_due_work_age_seconds", frozenset())] == 0
    age = await timer_left_due(aetr, 0.5)
    assert age < 60


async def test_metrics_answer_while_the_database_is_away(
        aetr: Server, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    age = await timer_left_due(aetr, 0.01)

    async def away() -> None:
        raise Unavailable("connection refused")

    monkeypatch.setattr(aetr.engine.store, "claimable_since", away)
    with caplog.at_level(logging.WARNING, logger="aetr.database"):
        samples = await scrape(aetr)
        await scrape(aetr)
    # The last value read stays: an alert on it neither fires nor clears for want of a reading.
    assert samples[("aetr_oldest_due_work_age_seconds", frozenset())] == age
    assert ("aetr_db_pool_size", frozenset({("pool", "sqlalchemy")})) in samples
    assert [r.message for r in caplog.records].count(
        "the database is unavailable (reading the oldest due work for /metrics: Unavailable); requests that need "
        "it are answered 503 with Retry-After, and background work is retried until it is back") == 1
    monkeypatch.undo()
    with caplog.at_level(logging.WARNING, logger="aetr.database"):
        samples = await scrape(aetr)
    assert samples[("aetr_oldest_due_work_age_seconds", frozenset())] > age
    assert any(r.message.startswith("the database is back") for r in caplog.records)
