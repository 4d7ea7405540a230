"""The callback window over real HTTP, on SQLite and PostgreSQL: calls past it wait for callbacks, a failed call
frees its place, and steps that call back late never hold the others up."""

from __future__ import annotations

from aetr.engine.pacing import CallbackWindow
from aetr.testing import StepService, never, status
from tests.integration.conftest import Server, running_server
from tests.integration.test_admission import WAIT_S, until
from tests.integration.test_runs import api


async def small_window(aetr: Server, size: int) -> CallbackWindow:
    """Give the server a window of `size` places that neither grows nor lets a call go by time."""
    dispatcher = aetr.engine.dispatcher
    assert dispatcher is not None and dispatcher.window is not None, "the window is on by default"
    await dispatcher.window.stop()
    dispatcher.window = CallbackWindow(0.02, size, size=size, hold_s=3600)
    dispatcher.window.start()
    return dispatcher.window


async def test_a_map_of_steps_that_call_back_late_makes_every_call_though_more_are_due_than_the_window_holds(
        database_url: str, steps_service: StepService) -> None:
    steps_service.route("/slow", never())
    async with running_server(database_url) as aetr:
        await aetr.put_step({"name": "all", "kind": "map", "child": {"step": api(steps_service, "slow")}})
        await aetr.start("all", list(range(100)))
        calls = await steps_service.wait_for_calls("/slow", 100, timeout=WAIT_S)
        window = aetr.engine.dispatcher.window  # type: ignore[union-attr]
        assert window is not None and window.waited > 0, "the 100 calls were due at once: some had to wait"
    assert sorted(c.json for c in calls) == list(range(100))


async def test_calls_past_a_full_window_are_made_one_by_one_as_callbacks_are_answered(
        database_url: str, steps_service: StepService) -> None:
    steps_service.route("/held", never())
    async with running_server(database_url) as aetr:
        window = await small_window(aetr, 2)
        await aetr.put_step({"name": "all", "kind": "map", "child": {"step": api(steps_service, "held")}})
        run_id = await aetr.start("all", list(range(5)))
        await steps_service.wait_for_calls("/held", 2)
        await until(lambda: window.queued == 3, "3 calls waiting for a place")
        assert len(steps_service.calls("/held")) == 2

        for answered in range(5):
            call = steps_service.calls("/held")[answered]
            async with aetr.http.post(call.callback_url, json={"item": call.json}) as resp:
                assert resp.status == 200 and await resp.json() == {"accepted": True}
            made = min(5, answered + 3)
            await steps_service.wait_for_calls("/held", made)
            assert len(steps_service.calls("/held")) == made, "one callback let one waiting call go, not more"
        run = await aetr.wait_run(run_id)
    assert run["state"] == "complete"
    assert sorted(o["item"] for o in run["output"]) == list(range(5))


async def test_a_call_that_fails_and_a_failure_callback_each_free_their_place(
        database_url: str, steps_service: StepService) -> None:
    steps_service.route("/broken", status(500, {"detail": "down"}))
    steps_service.route("/held", never())
    async with running_server(database_url) as aetr:
        await small_window(aetr, 1)
        for name in ("broken", "held"):
            await aetr.put_step({"name": name, "kind": "api", "url": steps_service.url(f"/{name}"),
                                 "retry": {"max_attempts": 1}})
        broken = await aetr.wait_run(await aetr.start("broken"))
        assert broken["state"] == "error"

        first = await aetr.start("held")  # the place the failed call held is free: this call goes at once
        (call,) = await steps_service.wait_for_calls("/held", 1)
        second = await aetr.start("held")
        async with aetr.http.post(f"{call.callback_url}/fail", json={"error": "no", "retryable": False}) as resp:
            assert resp.status == 200
        await steps_service.wait_for_calls("/held", 2)  # the failure callback freed the only place
        assert (await aetr.wait_run(first))["state"] == "error"
        status_code, run = await aetr.call("GET", f"/api/v1/runs/{second}")
        assert status_code == 200 and run["state"] == "executing"


async def test_with_the_target_at_zero_there_is_no_window(database_url: str, steps_service: StepService) -> None:
    steps_service.route("/slow", never())
    async with running_server(database_url, callback_target_ms=0) as aetr:
        assert aetr.engine.dispatcher is not None and aetr.engine.dispatcher.window is None
        await aetr.put_step({"name": "all", "kind": "map", "child": {"step": api(steps_service, "slow")}})
        await aetr.start("all", list(range(50)))
        await steps_service.wait_for_calls("/slow", 50, timeout=WAIT_S)
