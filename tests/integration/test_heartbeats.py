"""heartbeat_s: a step that keeps saying it is alive may run past it; one that goes quiet times out."""

from __future__ import annotations

import asyncio

from aiohttp import web

from aetr.testing import StepRequest, StepService, never
from tests.integration.conftest import Server

BEAT_S = 0.5
BEATS = 15  # one every BEAT_S / 5: a heartbeat handled up to 0.4 s late (a busy CI machine) still keeps it alive


async def beating(request: StepRequest) -> web.StreamResponse:
    """Heartbeat every BEAT_S / 5 for 3 × BEAT_S, then call back."""

    async def work() -> None:
        for _ in range(BEATS):
            await asyncio.sleep(BEAT_S / 5)  # the step's own pace, not a wait for AETR
            answer = await request.send_heartbeat()
            assert answer.status == 200
        await request.send_output({"done": True})

    request.later(work())
    return web.Response(status=202)


async def test_heartbeats_keep_a_long_step_alive(aetr: Server, steps_service: StepService) -> None:
    steps_service.route("/long", beating)
    await aetr.put_step({"name": "long", "kind": "api", "url": steps_service.url("/long"), "timeout_s": 30,
                         "heartbeat_s": BEAT_S, "retry": {"max_attempts": 1}})
    run = await aetr.wait_run(await aetr.start("long"))
    assert run["state"] == "complete" and run["output"] == {"done": True}
    _, events = await aetr.call("GET", f"/api/v1/runs/{run['id']}/events")
    assert sum(e["kind"] == "callback.heartbeat" for e in events) == BEATS


async def test_a_step_that_stops_beating_times_out_long_before_timeout_s(
        aetr: Server, steps_service: StepService) -> None:
    steps_service.route("/quiet", never())
    await aetr.put_step({"name": "quiet", "kind": "api", "url": steps_service.url("/quiet"), "timeout_s": 3600,
                         "heartbeat_s": BEAT_S, "retry": {"max_attempts": 1}})
    run = await aetr.wait_run(await aetr.start("quiet"), timeout=10)
    assert run["state"] == "error"
    assert run["error"]["kind"] == "timeout" and "heartbeat_s=0.5" in run["error"]["message"]


async def beating_at_once(request: StepRequest) -> web.StreamResponse:
    """A heartbeat right after the 202, then the output: the heartbeat lands while the call's answer waits to
    be written with it."""

    async def work() -> None:
        answer = await request.send_heartbeat()
        assert answer.status == 200
        await request.send_output({"done": True})

    request.later(work())
    return web.Response(status=202)


async def test_a_call_answer_written_with_a_heartbeat_is_in_the_history_once(
        aetr: Server, steps_service: StepService) -> None:
    steps_service.route("/quick", beating_at_once)
    await aetr.put_step({"name": "quick", "kind": "api", "url": steps_service.url("/quick"), "timeout_s": 30,
                         "heartbeat_s": 5, "retry": {"max_attempts": 1}})
    run_ids = await asyncio.gather(*(aetr.start("quick") for _ in range(10)))
    for run_id in run_ids:
        run = await aetr.wait_run(run_id)
        assert run["state"] == "complete"
        _, events = await aetr.call("GET", f"/api/v1/runs/{run_id}/events")
        kinds = [e["kind"] for e in events]
        assert kinds.count("dispatch") == 1, kinds
        assert kinds.count("callback.heartbeat") == 1, kinds
