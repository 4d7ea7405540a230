"""A database outage is an expected condition: logged once when it begins and once when it ends, no tracebacks."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest

from aetr.testing import StepService, never
from tests.e2e.harness import Api, Launcher
from tests.e2e.postgres import database_down, own_role

RUNS = 10
OUTAGE_LOG_TIMEOUT_S = 10.0  # seconds for the server to notice the outage (its claim loop polls every 0.2 s)
RUN_TIMEOUT_S = 30.0


async def _wait_for_log(aetr: object, text: str) -> None:
    deadline = time.monotonic() + OUTAGE_LOG_TIMEOUT_S
    while text not in aetr.log():  # type: ignore[attr-defined]
        assert time.monotonic() < deadline, f"{text!r} not logged within {OUTAGE_LOG_TIMEOUT_S} s"
        await asyncio.sleep(0.05)


@pytest.mark.parametrize("database_url", [pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True)
async def test_an_outage_is_logged_once_when_it_begins_and_once_when_it_ends(
        launcher: Launcher, database_url: str, http: aiohttp.ClientSession) -> None:
    async with own_role(database_url) as (role, url):
        aetr = await launcher.serve(url)
        api = Api(http, aetr.url)
        try:
            async with StepService() as svc:
                svc.route("/hold", never())
                await api.put_step({"name": "hold", "kind": "api", "url": svc.url("/hold")})
                run_ids = [await api.start_run("hold", k) for k in range(RUNS)]
                calls = await svc.wait_for_calls("/hold", RUNS)
                async with database_down(role):
                    during = [await api.call("POST", "/api/v1/runs", {"step": "hold", "input": 0}),
                              await api.call("GET", f"/api/v1/runs/{run_ids[0]}")]
                    for call in calls:
                        async with http.post(call.callback_url or "", json=call.json + 1) as response:
                            during.append((response.status, None))
                    await _wait_for_log(aetr, "the database is unavailable")
                await aetr.wait_healthy()
                await _wait_for_log(aetr, "the database is back")
                # The steps call back again, as they were told to (503 with Retry-After), and nothing was lost.
                for call in calls:
                    async with http.post(call.callback_url or "", json=call.json + 1) as response:
                        assert response.status == 200, await response.text()
                runs = [await api.wait_run(run_id, RUN_TIMEOUT_S) for run_id in run_ids]
        finally:
            await aetr.stop()

    assert [status for status, _ in during] == [503] * (RUNS + 2), during
    assert [(run["state"], run["output"]) for run in runs] == [("complete", k + 1) for k in range(RUNS)]
    log = aetr.log()
    assert log.count("the database is unavailable") == 1, log
    assert log.count("the database is back") == 1, log
    assert "Traceback" not in log, log
