"""Admission of run starts: callbacks and /healthz are answered while starts wait; a full queue answers 503."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import asyncpg

from aetr.engine.admission import StartGate
from aetr.testing import StepService, never
from tests.integration.conftest import Server, running_server

WAIT_S = 10.0  # seconds a condition may take to come true before the test fails


async def until(condition: Callable[[], bool], what: str) -> None:
    """Return once `condition()` holds; fail the test when it has not within WAIT_S."""
    deadline = asyncio.get_running_loop().time() + WAIT_S
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, f"not within {WAIT_S} s: {what}"
        await asyncio.sleep(0.005)  # polls a condition the server's own loop changes


@asynccontextmanager
async def every_place_taken(gate: StartGate) -> AsyncIterator[None]:
    """Hold every place of the gate, as that many starts being handled would."""
    async with AsyncExitStack() as held:
        for _ in range(gate.at_once):
            await held.enter_async_context(gate.place())
        yield


async def held_step(aetr: Server, steps_service: StepService) -> None:
    steps_service.route("/held", never())  # the test answers in the step's place
    await aetr.put_step({"name": "held", "kind": "api", "url": steps_service.url("/held"), "timeout_s": 60,
                         "retry": {"max_attempts": 1}})


def start_requests(aetr: Server, n: int) -> list[asyncio.Task[tuple[int, Any]]]:
    return [asyncio.create_task(aetr.call("POST", "/api/v1/runs", {"step": "held", "input": i})) for i in range(n)]


async def test_a_callback_and_healthz_are_answered_while_more_starts_wait_than_are_handled(
        database_url: str, steps_service: StepService) -> None:
    async with running_server(database_url) as aetr:
        await held_step(aetr, steps_service)
        run_id = await aetr.start("held")
        (call,) = await steps_service.wait_for_calls("/held", 1)
        gate = aetr.engine.starts
        waiting = 3 * gate.at_once
        async with every_place_taken(gate):
            starts = start_requests(aetr, waiting)
            await until(lambda: gate.waiting == waiting, f"{waiting} starts waiting for a place")

            async with aetr.http.post(call.callback_url, json={"done": True}) as resp:
                assert resp.status == 200 and await resp.json() == {"accepted": True}
            status, health = await aetr.call("GET", "/healthz")
            assert status == 200 and health == {"status": "ok"}
            assert (await aetr.wait_run(run_id))["output"] == {"done": True}

            # Answered while every start still waited: none of them has been handled.
            assert gate.waiting == waiting and not any(task.done() for task in starts)
        answers = await asyncio.gather(*starts)
    assert [status for status, _ in answers] == [201] * waiting


async def test_a_start_past_the_full_queue_is_refused_with_503_and_retry_after_and_starts_nothing(
        database_url: str, steps_service: StepService) -> None:
    async with running_server(database_url, max_pending_starts=2) as aetr:
        await held_step(aetr, steps_service)
        gate = aetr.engine.starts
        async with every_place_taken(gate):
            starts = start_requests(aetr, 2)
            await until(lambda: gate.waiting == 2, "2 starts waiting for a place")
            async with aetr.http.post(f"{aetr.base_url}/api/v1/runs", json={"step": "held", "input": "late"}) as resp:
                assert resp.status == 503
                assert resp.headers["Retry-After"] == "1"
                detail = (await resp.json())["detail"]
            assert "AETR_MAX_PENDING_STARTS=2" in detail and "nothing was started" in detail
        assert [status for status, _ in await asyncio.gather(*starts)] == [201, 201]
        status, page = await aetr.call("GET", "/api/v1/runs")
        assert status == 200
        assert sorted(run["input"] for run in page["runs"]) == [0, 1]  # the refused start made no run
        assert len(steps_service.calls("/held")) == 2


@asynccontextmanager
async def starts_held(aetr: Server) -> AsyncIterator[None]:
    """Keep the server's starts from committing: on SQLite every write waits for the file's write lock, held
    here; on PostgreSQL the step trees starts read are locked (a callback's event does not read them)."""
    if aetr.engine.store.dialect == "sqlite":
        conn = sqlite3.connect(aetr.engine.store.path, isolation_level=None)
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        finally:
            conn.rollback()
            conn.close()
        return
    url = aetr.engine.store.dsn
    conn_pg = await asyncpg.connect(url)
    tx = conn_pg.transaction()
    await tx.start()
    await conn_pg.execute("LOCK TABLE steps IN ACCESS EXCLUSIVE MODE")
    try:
        yield
    finally:
        await tx.rollback()
        await conn_pg.close()


async def test_a_callback_is_committed_before_the_starts_queued_with_it(
        database_url: str, steps_service: StepService) -> None:
    async with running_server(database_url) as aetr:
        await held_step(aetr, steps_service)
        run_id = await aetr.start("held")
        (call,) = await steps_service.wait_for_calls("/held", 1)
        assert call.node_id is not None and call.attempt is not None
        coordinator = aetr.engine.coordinator
        finished: list[str] = []

        async def start(i: int) -> None:
            await coordinator.start_run("held", i, None)  # past the gate: the store's own order is tested
            finished.append(f"start {i}")

        async def callback() -> None:
            await coordinator.step_succeeded(call.node_id or "", call.attempt or 0, {"done": True}, "callback")
            finished.append("callback")

        n = 40
        async with starts_held(aetr):
            starts = []
            for i in range(n):
                starts.append(asyncio.create_task(start(i)))
                await asyncio.sleep(0)  # one turn: the start reaches the store (each its own batch, if it may)
            answered = asyncio.create_task(callback())
            if aetr.engine.store.dialect == "postgresql":
                # The starts wait for the lock; the callback's event does not.
                await asyncio.wait_for(answered, WAIT_S)
                assert finished == ["callback"]
            else:
                await asyncio.sleep(0)  # one turn: the callback reaches the writer's queue behind the starts
        await asyncio.wait_for(asyncio.gather(answered, *starts), WAIT_S)
        # SQLite: only the start whose group was already waiting for the lock may commit before the callback.
        assert finished.index("callback") <= 1
        assert (await aetr.wait_run(run_id))["output"] == {"done": True}
        status, page = await aetr.call("GET", "/api/v1/runs?limit=100")
        assert status == 200 and len(page["runs"]) == n + 1


async def test_aetr_starts_at_once_is_how_many_starts_are_handled_while_the_others_wait(
        database_url: str, steps_service: StepService) -> None:
    async with running_server(database_url, starts_at_once=2) as aetr:
        await held_step(aetr, steps_service)
        gate = aetr.engine.starts
        async with starts_held(aetr):  # the two handled cannot finish: the three others wait for their places
            starts = start_requests(aetr, 5)
            await until(lambda: gate.waiting == 3, "3 starts waiting behind the 2 handled")
            assert not any(task.done() for task in starts)
        answers = await asyncio.gather(*starts)
    assert [status for status, _ in answers] == [201] * 5
    assert len(await steps_service.wait_for_calls("/held", 5)) == 5
