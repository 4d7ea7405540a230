"""/metrics: runs, attempts and callbacks counted by step and outcome, the oldest due work, the database pools."""

from __future__ import annotations

import asyncio

import orjson
from prometheus_client.parser import text_string_to_metric_families

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
    assert 0.3 <= slow_s < 10  # the time-out is 0.3 s from the call
    assert grew(before, after, "aetr_attempt_duration_seconds_bucket", step="m-slow", outcome="timed_out",
                le="0.25") == 0

    assert grew(before, after, "aetr_step_reports_total", source="callback", outcome="accepted") == 2  # ok, flaky
    assert grew(before, after, "aetr_step_reports_total", source="callback", outcome="duplicate") == 1
    assert grew(before, after, "aetr_step_reports_total", source="callback.fail", outcome="accepted") == 1


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
    # No process is left to claim work: a wait's timer comes due and nobody ends it.
    await aetr.engine.worker.stop()
    await aetr.put_step({"name": "m-pause", "kind": "wait", "seconds": 0.2})
    await aetr.start("m-pause")
    deadline = asyncio.get_running_loop().time() + 10
    while (age := (await scrape(aetr))[("aetr_oldest_due_work_age_seconds", frozenset())]) < 0.5:
        assert asyncio.get_running_loop().time() < deadline, f"the age stayed at {age}"
        await asyncio.sleep(0.05)  # polling /metrics until the timer has waited 0.5 s past its due time
    assert age < 60
