"""Map, choice and wait end to end over real HTTP, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
from datetime import UTC, datetime
from typing import Any

import asyncpg
import pytest

from aetr.testing import StepService, callback, fail, never, sync
from tests.integration.conftest import Server
from tests.integration.test_runs import api, by_name


def children_states(node: dict[str, Any]) -> list[str]:
    return [c["state"] for c in node["children"]]


async def test_a_map_calls_its_step_once_per_item_and_reduces_in_item_order(aetr: Server,
                                                                            steps_service: StepService) -> None:
    steps_service.route("/resize", callback(lambda x: {"small": x["url"] + "?w=100", "n": x["n"]}))
    await aetr.put_step({"name": "resize-all", "kind": "map", "items": "(input) => input.products",
                         "child": {"step": api(steps_service, "resize"),
                                   "mapper": "(item, ctx) => ({url: item.image, n: ctx.index})"}})
    products = [{"image": f"/img/{i}.png"} for i in range(25)]
    run = await aetr.wait_run(await aetr.start("resize-all", {"products": products}))
    assert run["state"] == "complete", run
    assert run["output"] == [{"small": f"/img/{i}.png?w=100", "n": i} for i in range(25)]
    assert [c["position"] for c in run["children"]] == list(range(25))
    assert len(steps_service.calls("/resize")) == 25


async def test_an_empty_map_completes_at_once_and_a_map_of_no_list_fails_saying_what_it_got(
        aetr: Server, steps_service: StepService) -> None:
    await aetr.put_step({"name": "m", "kind": "map", "child": {"step": api(steps_service, "x")},
                         "reducer": "(outs) => outs.length"})
    empty = await aetr.wait_run(await aetr.start("m", []))
    assert empty["state"] == "complete" and empty["output"] == 0 and empty["children"] == []
    bad = await aetr.wait_run(await aetr.start("m", {"not": "a list"}))
    assert bad["state"] == "error"
    assert bad["error"]["kind"] == "mapper"
    assert bad["error"]["message"] == "a map needs an array of items, but its input is an object"


async def test_max_concurrency_limits_the_items_in_flight_at_the_step(aetr: Server,
                                                                      steps_service: StepService) -> None:
    in_flight = 0
    most = 0

    async def slow(body: Any) -> Any:
        nonlocal in_flight, most
        in_flight += 1
        most = max(most, in_flight)
        await asyncio.sleep(0.02)
        in_flight -= 1
        return body * 2

    steps_service.route("/double", sync(slow))
    await aetr.put_step({"name": "limited", "kind": "map", "max_concurrency": 3,
                         "child": {"step": api(steps_service, "double", mode="sync")}})
    run = await aetr.wait_run(await aetr.start("limited", list(range(20))), timeout=30)
    assert run["state"] == "complete", run
    assert run["output"] == [i * 2 for i in range(20)]
    assert 1 <= most <= 3


async def test_tolerated_failures_complete_the_map_with_null_for_failed_items_and_redrive_reruns_only_them(
        aetr: Server, steps_service: StepService) -> None:
    steps_service.route("/check", callback(lambda x: {"ok": x}))
    steps_service.route("/flaky", fail("out of stock", retryable=False))
    await aetr.put_step({"name": "picky", "kind": "map", "tolerated_failures": 1,
                         "child": {"step": {"name": "route-item", "kind": "choice", "children": [
                             {"step": api(steps_service, "flaky"), "when": "(x) => x < 0"},
                             {"step": api(steps_service, "check")}]}}})
    run = await aetr.wait_run(await aetr.start("picky", [1, -1, 2]))
    assert run["state"] == "complete", run
    assert run["output"] == [{"ok": 1}, None, {"ok": 2}]
    assert children_states(run) == ["complete", "error", "complete"]

    over = await aetr.wait_run(await aetr.start("picky", [-1, 5, -2]))
    assert over["state"] == "error"
    calls_before = len(steps_service.calls("/check"))
    steps_service.route("/flaky", callback(lambda x: {"fixed": x}))
    status, _ = await aetr.call("POST", f"/api/v1/runs/{over['id']}/retry")
    assert status == 200
    again = await aetr.wait_run(over["id"])
    assert again["state"] == "complete", again
    assert again["output"] == [{"fixed": -1}, {"ok": 5}, {"fixed": -2}]
    assert len(steps_service.calls("/check")) - calls_before <= 1  # only items that had not completed


async def test_a_choice_runs_the_first_matching_child_and_skips_the_rest(aetr: Server,
                                                                         steps_service: StepService) -> None:
    steps_service.route("/manual-review", callback(lambda x: {"reviewed": x["id"]}))
    steps_service.route("/auto-approve", callback(lambda x: {"approved": x["id"]}))
    await aetr.put_step({"name": "route-order", "kind": "choice", "children": [
        {"step": api(steps_service, "manual-review"), "when": "(input, ctx) => input.total > 1000"},
        {"step": api(steps_service, "auto-approve"), "mapper": "(input) => ({id: input.id})"}]})
    big = await aetr.wait_run(await aetr.start("route-order", {"id": 7, "total": 5000}))
    assert big["output"] == {"reviewed": 7}
    assert by_name(big)["auto-approve"]["state"] == "skipped"
    small = await aetr.wait_run(await aetr.start("route-order", {"id": 8, "total": 10}))
    assert small["output"] == {"approved": 8}
    assert by_name(small)["manual-review"]["state"] == "skipped"
    status, tree = await aetr.call("GET", "/api/v1/steps/route-order")
    assert status == 200 and [c["when"] for c in tree["children"]] == ["(input, ctx) => input.total > 1000", None]


async def test_a_choice_whose_default_is_not_last_is_refused_saying_where(aetr: Server,
                                                                          steps_service: StepService) -> None:
    status, body = await aetr.call("PUT", "/api/v1/steps/c", {"name": "c", "kind": "choice", "children": [
        {"step": api(steps_service, "a")}, {"step": api(steps_service, "b"), "when": "() => true"}]})
    assert status == 422 and "child 0 has no `when`" in body["detail"]
    status, body = await aetr.call("PUT", "/api/v1/steps/w", {"name": "w", "kind": "wait", "seconds": 5,
                                                              "signal": True})
    assert status == 422 and "exactly one of `seconds`, `until` or `signal: true`" in body["detail"]
    status, _ = await aetr.call("GET", "/api/v1/steps/w")
    assert status == 404


async def test_a_timed_wait_ends_on_its_timer_and_shows_when(aetr: Server, steps_service: StepService) -> None:
    steps_service.route("/after", callback(lambda x: {"after": x}))
    await aetr.put_step({"name": "cool-off", "kind": "sequential", "children": [
        {"step": {"name": "pause", "kind": "wait", "seconds": 0.5}}, {"step": api(steps_service, "after")}]})
    started = datetime.now(UTC)
    run_id = await aetr.start("cool-off", {"k": 1})
    status, running = await aetr.call("GET", f"/api/v1/runs/{run_id}")
    assert status == 200
    pause = by_name(running)["pause"]
    assert pause["state"] == "executing" and pause["awaits_signal"] is False
    assert datetime.fromisoformat(pause["wait_until"]) >= started
    run = await aetr.wait_run(run_id)
    assert run["output"] == {"after": {"k": 1}}
    assert (datetime.fromisoformat(by_name(run)["pause"]["completed_at"]) - started).total_seconds() >= 0.5


async def test_a_signal_wait_completes_with_the_signal_and_refuses_a_second_one(aetr: Server,
                                                                               steps_service: StepService) -> None:
    await aetr.put_step({"name": "approval", "kind": "wait", "signal": True, "timeout_s": 600})
    run_id = await aetr.start("approval", {"order": 1})
    status, run = await aetr.call("GET", f"/api/v1/runs/{run_id}")
    assert status == 200 and run["awaits_signal"] is True and run["state"] == "executing"
    path = f"/api/v1/runs/{run_id}/nodes/{run_id}/signal"
    status, body = await aetr.call("POST", path, {"output": "x", "error": "y"})
    assert status == 422
    status, body = await aetr.call("POST", path, {"output": {"approved_by": "ann"}})
    assert status == 200 and body["state"] == "complete" and body["output"] == {"approved_by": "ann"}
    assert body["awaits_signal"] is False
    status, body = await aetr.call("POST", path, {"output": 1})
    assert status == 409 and "complete" in body["detail"]
    status, body = await aetr.call("POST", f"/api/v1/runs/{run_id}/nodes/00000000-0000-7000-8000-000000000000/signal",
                                   {"output": 1})
    assert status == 404

    rejected = await aetr.start("approval", {})
    status, body = await aetr.call("POST", f"/api/v1/runs/{rejected}/nodes/{rejected}/signal",
                                   {"error": "too expensive"})
    assert status == 200 and body["state"] == "error"
    assert body["error"]["kind"] == "signal" and body["error"]["message"] == "too expensive"
    status, metrics = await aetr.call("GET", "/metrics")
    assert status == 200 and 'aetr_waits_ended_total{how="signal"}' in metrics.decode()


async def test_a_signal_on_a_node_that_is_not_a_signal_wait_is_a_conflict(aetr: Server,
                                                                          steps_service: StepService) -> None:
    steps_service.route("/slow", callback(lambda x: x, delay=5))
    await aetr.put_step(api(steps_service, "slow"))
    run_id = await aetr.start("slow", 1)
    status, body = await aetr.call("POST", f"/api/v1/runs/{run_id}/nodes/{run_id}/signal", {"output": 1})
    assert status == 409 and "not a wait step" in body["detail"]
    status, body = await aetr.call("POST", f"/api/v1/runs/{run_id}/cancel")
    assert status == 200


async def test_an_api_step_max_concurrency_holds_across_runs_and_hands_slots_on_in_due_order(
        aetr: Server, steps_service: StepService) -> None:
    in_flight = 0
    most = 0
    order: list[int] = []
    full = asyncio.Event()  # the calls wait (up to 5 s) until the limit is reached once: it must be reachable

    async def slow(body: Any) -> Any:
        nonlocal in_flight, most
        in_flight += 1
        most = max(most, in_flight)
        order.append(body)
        if in_flight >= 3:
            full.set()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(full.wait(), 5)
        await asyncio.sleep(0.01)
        in_flight -= 1
        return {"done": body}

    steps_service.route("/guarded", sync(slow))
    await aetr.put_step(api(steps_service, "guarded", mode="sync", max_concurrency=3))
    runs = [await aetr.start("guarded", i) for i in range(12)]
    status, first = await aetr.call("GET", f"/api/v1/runs/{runs[-1]}")
    assert status == 200 and first["state"] in ("pending", "executing", "complete")
    ended = [await aetr.wait_run(run_id, timeout=30) for run_id in runs]
    assert [r["output"] for r in ended] == [{"done": i} for i in range(12)]
    assert most == 3

    order.clear()
    await aetr.put_step(api(steps_service, "guarded", mode="sync", max_concurrency=1))
    runs = [await aetr.start("guarded", i) for i in range(6)]
    ended = [await aetr.wait_run(run_id, timeout=30) for run_id in runs]
    assert all(r["state"] == "complete" for r in ended)
    assert order == list(range(6))  # one slot: each waiting attempt is called in the order it became due


async def test_max_concurrency_holds_when_many_runs_start_and_hand_slots_on_together(
        aetr: Server, steps_service: StepService) -> None:
    # Started together, the runs' events share batches: PostgreSQL takes their slots, and claims the attempts
    # that slots freed together go to, in one statement per step. Never more than the limit, none left waiting.
    in_flight = 0
    most = 0
    full = asyncio.Event()

    async def slow(body: Any) -> Any:
        nonlocal in_flight, most
        in_flight += 1
        most = max(most, in_flight)
        if in_flight >= 4:
            full.set()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(full.wait(), 5)
        await asyncio.sleep(0.005)
        in_flight -= 1
        return {"done": body}

    steps_service.route("/crowded", sync(slow))
    await aetr.put_step(api(steps_service, "crowded", mode="sync", max_concurrency=4))
    runs = await asyncio.gather(*(aetr.start("crowded", i) for i in range(60)))
    ended = [await aetr.wait_run(run_id, timeout=60) for run_id in runs]
    assert [r["output"] for r in ended] == [{"done": i} for i in range(60)]
    assert most == 4


async def test_a_refused_report_from_a_slot_holder_leaves_the_waiting_attempt_waiting_for_the_next_slot(
        aetr: Server, steps_service: StepService) -> None:
    # On PostgreSQL an event that ends a slot holder's attempt claims the step's longest-waiting attempt with the
    # chain it reads. A report that is then refused (an attempt superseded) frees no slot: what it claimed waits
    # again at once, so the next slot freed goes to it, not after the claim's lease runs out (5 s).
    steps_service.route("/one", never())
    await aetr.put_step(api(steps_service, "one", max_concurrency=1))
    await aetr.start("one", 1)
    (holder,) = await steps_service.wait_for_calls("/one", 1)
    waiting = await aetr.start("one", 2)
    assert holder.node_id is not None
    verdict = await aetr.engine.coordinator.step_succeeded(holder.node_id, 7, {"late": True}, "callback")
    assert verdict.outcome == "refused" and "superseded" in verdict.reason, verdict
    assert await aetr.call("POST", holder.callback_url.removeprefix(aetr.base_url), {"ok": 1}) == (
        200, {"accepted": True})
    started = asyncio.get_running_loop().time()
    second = (await steps_service.wait_for_calls("/one", 2, timeout=10))[1]
    assert second.run_id == waiting
    assert asyncio.get_running_loop().time() - started < 3, "called only once the claim ran out"


async def _until(condition: Any, what: str, timeout: float = 10.0) -> None:  # noqa: ASYNC109
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, what
        await asyncio.sleep(0.02)


@pytest.mark.postgres
async def test_a_slot_row_taken_by_an_event_that_never_wrote_is_free_again_only_once_it_is_old(
        pg_url: str, steps_service: StepService) -> None:
    """PostgreSQL takes a slot in a statement of its own, before the event's write: when that write never comes
    (the process died in between), the row names a holder that does not hold it. A recent such row still counts
    (its event may be about to write); an old one is free again."""
    from tests.integration.conftest import running_server

    steps_service.route("/ghosted", callback(lambda x: x, delay=0.1))
    async with running_server(pg_url) as aetr:
        await aetr.put_step(api(steps_service, "ghosted", max_concurrency=1))
        status, step = await aetr.call("GET", "/api/v1/steps/ghosted")
        assert status == 200
        conn = await asyncpg.connect(pg_url, timeout=5)
        try:
            await conn.execute("INSERT INTO step_slots (step_id, slot, holder_id, holder_attempt, taken_at)"
                               " VALUES ($1, 0, 'a-node-never-written', 1, now())", step["id"])
            first = await aetr.start("ghosted", 1)
            status, run = await aetr.call("GET", f"/api/v1/runs/{first}")
            assert status == 200 and run["state"] == "pending", run  # the recent row holds the only slot
            assert steps_service.calls("/ghosted") == []
            await conn.execute("UPDATE step_slots SET taken_at = now() - interval '2 minutes'"
                               " WHERE holder_id = 'a-node-never-written'")
            second = await aetr.start("ghosted", 2)  # takes the abandoned slot, then hands it to the first
            ended = [await aetr.wait_run(run_id, timeout=20) for run_id in (first, second)]
            assert [r["state"] for r in ended] == ["complete", "complete"]
            assert [c.json for c in steps_service.calls("/ghosted")] == [2, 1]
            held = await conn.fetchval("SELECT count(*) FROM step_slots WHERE step_id = $1 AND holder_id IS NOT NULL",
                                       step["id"])
            assert held == 0
        finally:
            await conn.close()


async def test_a_slot_is_freed_by_a_cancel_and_by_a_failed_attempt(aetr: Server,
                                                                   steps_service: StepService) -> None:
    steps_service.route("/one", callback(lambda x: x, delay=30))
    steps_service.route("/failing", fail("no", delay=0.2))
    await aetr.put_step(api(steps_service, "one", max_concurrency=1, retry={"max_attempts": 1}))
    holder = await aetr.start("one", 1)
    await _until(lambda: len(steps_service.calls("/one")) == 1, "the first run was not called")
    waiter = await aetr.start("one", 2)
    status, body = await aetr.call("GET", f"/api/v1/runs/{waiter}")
    assert status == 200 and body["state"] == "pending"  # waits for the one slot
    status, _ = await aetr.call("POST", f"/api/v1/runs/{holder}/cancel")
    assert status == 200
    await _until(lambda: len(steps_service.calls("/one")) == 2, "the slot freed by a cancel was not handed on")
    assert [c.json for c in steps_service.calls("/one")] == [1, 2]

    await aetr.put_step(api(steps_service, "failing", max_concurrency=1, retry={"max_attempts": 1}))
    first, second = await aetr.start("failing", 1), await aetr.start("failing", 2)
    assert (await aetr.wait_run(first))["state"] == "error"
    assert (await aetr.wait_run(second))["state"] == "error"  # called once the first attempt failed
    assert [c.json for c in steps_service.calls("/failing")] == [1, 2]
    status, _ = await aetr.call("POST", f"/api/v1/runs/{waiter}/cancel")
    assert status == 200


async def test_a_map_or_choice_that_would_contain_itself_is_refused_with_the_cycle(aetr: Server,
                                                                                  steps_service: StepService) -> None:
    await aetr.put_step({"name": "outer", "kind": "sequential", "children": [{"step": api(steps_service, "a")}]})
    status, body = await aetr.call("PUT", "/api/v1/steps/fan", {"name": "fan", "kind": "map",
                                                               "child": {"step": "outer"}})
    assert status == 201, body
    status, body = await aetr.call("PUT", "/api/v1/steps/outer", {"name": "outer", "kind": "choice", "children": [
        {"step": "fan", "when": "(x) => x.deep"}, {"step": "a"}]})
    assert status == 422 and "outer → fan → outer" in body["detail"]
    status, tree = await aetr.call("GET", "/api/v1/steps/fan")
    assert status == 200 and tree["child"]["step"]["kind"] == "sequential"  # nothing of the refused change kept
