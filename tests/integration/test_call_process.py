"""Step calls made in a process of their own (AETR_STEP_CALLS=process): the same answers as calls made in the
serving process, a call process that dies, and one whose serving process dies."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from aetr.domain.hosts import AllowedHosts
from aetr.engine import calls, coordinator
from aetr.engine.calls import Answer, CallFailed, InlineCaller, ProcessCaller
from aetr.engine.dispatcher import INLINE_UP_TO
from aetr.testing import Behaviour, StepService
from aetr.testing.step_service import StepRequest
from tests.integration.conftest import Server, free_port, running_server

LIMIT = 64 * 1024
EXCERPT = 300
DEADLINE_S = 10.0


def is_call_process(pid: int) -> bool:
    try:
        return b"aetr.engine.calls" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


async def until(condition: Callable[[], bool], what: str, timeout: float = DEADLINE_S) -> None:  # noqa: ASYNC109
    """Wait for `condition()` to hold, failing the test after `timeout` seconds."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, f"{what}: not within {timeout} s"
        await asyncio.sleep(0.02)


@pytest.fixture(params=["inline", "process"])
async def caller(request: pytest.FixtureRequest) -> AsyncIterator[InlineCaller | ProcessCaller]:
    made = (ProcessCaller if request.param == "process" else InlineCaller)(16)
    await made.start()
    try:
        yield made
    finally:
        await made.close()


@pytest.fixture
async def svc() -> AsyncIterator[StepService]:
    async with StepService() as service:
        yield service


def replying(status: int, body: bytes, **headers: str) -> Behaviour:
    async def behaviour(request: StepRequest) -> web.StreamResponse:
        return web.Response(status=status, body=body, headers=headers)

    return behaviour


async def call(caller: InlineCaller | ProcessCaller, url: str, body: bytes = b"{}", timeout_s: float = 5.0,
               keep_ok: int = LIMIT) -> Answer:
    return await caller.call("POST", url, {"Content-Type": "application/json", "X-Test": "yes"}, body, timeout_s,
                             LIMIT, keep_ok, EXCERPT)


async def test_a_call_sends_the_request_and_brings_back_the_answer(caller: InlineCaller | ProcessCaller,
                                                                   svc: StepService) -> None:
    svc.route("/ok", replying(200, b'{"done": true}', **{"Content-Type": "application/json"}))
    answer = await call(caller, svc.url("/ok") + "?aetr=a%2Fb", body=b'{"n": 1}')
    assert (answer.status, answer.body, answer.over) == (200, b'{"done": true}', False)
    assert (answer.content_type or "").startswith("application/json")
    (seen,) = svc.calls("/ok")
    assert seen.json == {"n": 1} and seen.headers["X-Test"] == "yes" and seen.query["aetr"] == "a/b"


async def test_an_error_answer_keeps_its_headers_and_the_start_of_its_body(caller: InlineCaller | ProcessCaller,
                                                                           svc: StepService) -> None:
    svc.route("/busy", replying(503, b"e" * 5000, **{"Retry-After": "7"}))
    svc.route("/moved", replying(302, b"", Location=svc.url("/target")))
    svc.route("/target", replying(200, b"{}"))
    busy = await call(caller, svc.url("/busy"))
    assert (busy.status, busy.retry_after, len(busy.body), busy.over) == (503, "7", EXCERPT, False)
    moved = await call(caller, svc.url("/moved"))
    assert (moved.status, moved.location) == (302, svc.url("/target"))
    assert svc.calls("/target") == []  # redirects are not followed


@pytest.fixture
async def echo_url() -> AsyncIterator[str]:
    """A step that takes bodies of any size and answers with the body it got (an aiohttp server: the step
    service's own stops at aiohttp's 1 MiB)."""

    async def echo(request: web.Request) -> web.StreamResponse:
        return web.Response(status=200, body=await request.read())

    app = web.Application(client_max_size=16 * 1024 * 1024)
    app.router.add_post("/echo", echo)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}/echo"
    finally:
        await runner.cleanup()


async def test_large_bodies_go_whole_both_ways_and_an_oversized_answer_is_not_read_past_the_limit(
        caller: InlineCaller | ProcessCaller, echo_url: str) -> None:
    big = b'"' + b"x" * (3 * 1024 * 1024) + b'"'  # over 1 MiB: streamed to the step
    whole = await caller.call("POST", echo_url, {}, big, 5.0, 4 * 1024 * 1024, 4 * 1024 * 1024, EXCERPT)
    assert (whole.status, whole.body, whole.over) == (200, big, False)
    over = await caller.call("POST", echo_url, {}, big, 5.0, 1024 * 1024, 1024 * 1024, EXCERPT)
    assert over.over and len(over.body) <= 1024 * 1024


async def test_no_answer_in_time_and_no_connection_are_told_apart(caller: InlineCaller | ProcessCaller,
                                                                  svc: StepService) -> None:
    async def slow(request: StepRequest) -> web.StreamResponse:
        await asyncio.sleep(1)  # past the call's time-out
        return web.Response(status=200)

    svc.route("/slow", slow)
    with pytest.raises(CallFailed) as late:
        await call(caller, svc.url("/slow"), timeout_s=0.3)
    assert late.value.kind == "timeout" and "0.3 s" in str(late.value)
    with pytest.raises(CallFailed) as down:
        await call(caller, f"http://127.0.0.1:{free_port()}/step")
    assert down.value.kind == "unreachable" and str(down.value)


async def test_the_call_process_refuses_hosts_outside_the_allow_list(svc: StepService) -> None:
    svc.route("/ok", replying(200, b"{}"))
    caller = ProcessCaller(4, AllowedHosts.parse("10.0.0.0/8"))
    await caller.start()
    try:
        with pytest.raises(CallFailed) as refused:
            await call(caller, svc.url("/ok").replace("127.0.0.1", "localhost"))
        assert refused.value.kind == "refused" and "AETR_ALLOWED_STEP_HOSTS" in str(refused.value)
    finally:
        await caller.close()
    assert svc.calls("/ok") == []


async def test_a_call_process_that_dies_fails_its_calls_under_way_and_another_takes_its_place(
        svc: StepService) -> None:
    arrived, released = asyncio.Event(), asyncio.Event()

    async def hang(request: StepRequest) -> web.StreamResponse:
        arrived.set()
        await asyncio.wait_for(released.wait(), 30)
        return web.Response(status=200)

    svc.route("/hang", hang)
    svc.route("/ok", replying(202, b""))
    caller = ProcessCaller(4)
    await caller.start()
    try:
        first = caller.pid
        assert first is not None
        await until(lambda: is_call_process(first), "the call process runs")
        under_way = asyncio.create_task(call(caller, svc.url("/hang"), timeout_s=25))
        await asyncio.wait_for(arrived.wait(), DEADLINE_S)
        os.kill(first, signal.SIGKILL)
        with pytest.raises(CallFailed) as lost:
            await asyncio.wait_for(under_way, DEADLINE_S)
        assert lost.value.kind == "unreachable" and "call process stopped" in str(lost.value)
        assert (await call(caller, svc.url("/ok"))).status == 202
        assert caller.pid not in (None, first)
    finally:
        released.set()
        await caller.close()
    assert caller.pid is None and not is_call_process(first)


async def test_the_call_process_ends_with_the_serving_process_that_started_it(tmp_path: Path) -> None:
    # A serving process killed outright (no shutdown) must not leave its call process behind.
    script = textwrap.dedent("""
        import asyncio, sys
        from aetr.engine.calls import ProcessCaller

        async def main():
            caller = ProcessCaller(4)
            await caller.start()
            print(caller.pid, flush=True)
            await asyncio.sleep(60)

        asyncio.run(main())
    """)
    parent = await asyncio.create_subprocess_exec(sys.executable, "-c", script, stdout=subprocess.PIPE)
    try:
        assert parent.stdout is not None
        child = int(await asyncio.wait_for(parent.stdout.readline(), DEADLINE_S))
        await until(lambda: is_call_process(child), "the call process started")
        parent.kill()
        await parent.wait()
        await until(lambda: not is_call_process(child), "the call process ended with its parent")
    finally:
        if parent.returncode is None:
            parent.kill()
            await parent.wait()


FAN = 12  # calls under way at once: more than the serving process makes itself (INLINE_UP_TO)


@pytest.mark.parametrize("mode", ["process", "inline"])
async def test_calls_under_way_past_the_first_few_go_to_the_call_process_and_runs_complete(
        database_url: str, steps_service: StepService, mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # A report waits at most ANSWER_WAIT_S (50 ms) for its call's answer; on a machine busy with the rest of the
    # suite the answer once took longer (CI, PostgreSQL). What is tested is that the report waits for it: give
    # the wait room. Each wait ends when the answer comes, so this costs the test nothing.
    monkeypatch.setattr(coordinator, "ANSWER_WAIT_S", 5.0)
    arrived: list[asyncio.Event] = []
    everyone = asyncio.Event()

    async def hold(request: StepRequest) -> web.StreamResponse:
        # Each call is answered only once all of them have been made: they are all under way at once. And each
        # step reports before it answers its call (as a step that hands its work to a queue may).
        arrived.append(asyncio.Event())
        if len(arrived) == FAN:
            everyone.set()
        await asyncio.wait_for(everyone.wait(), DEADLINE_S)
        request.later(request.send_output(request.input["n"] * 2))
        await asyncio.sleep(0.01)
        return web.Response(status=202)

    steps_service.route("/hold", hold)
    async with running_server(database_url, step_calls=mode) as aetr:
        await aetr.put_step({"name": "hold", "kind": "api", "url": steps_service.url("/hold")})
        await aetr.put_step({"name": "fan", "kind": "parallel", "reducer": "array",
                             "children": [{"step": "hold", "mapper": f"() => ({{n: {i}}})"} for i in range(FAN)]})
        before = await scrape_apart(aetr)
        run_id = await aetr.start("fan")
        run = await aetr.wait_run(run_id)
        assert run["state"] == "complete" and run["output"] == [2 * i for i in range(FAN)]
        if mode == "process":
            # Each step reported before it answered its call, and the answer came the longer way round when the
            # call process made the call: the history still says the call was answered before the step reported.
            by_node: dict[str, list[str]] = {}
            for event in await aetr.events(run_id):
                if event["kind"] in ("dispatch", "callback"):
                    by_node.setdefault(event["node_id"], []).append(event["kind"])
            assert sorted(by_node.values()) == [["dispatch", "callback"]] * FAN, by_node
        apart = await scrape_apart(aetr) - before
        pid = running_call_process(aetr)
        if mode == "process":
            assert pid is not None
            await until(lambda: is_call_process(pid), "the call process runs")
            assert FAN - INLINE_UP_TO <= apart < FAN, apart  # the first few were made by the serving process
        else:
            assert pid is None and apart == 0
    if pid is not None:
        await until(lambda: not is_call_process(pid), "the call process stopped with the server")


async def scrape_apart(aetr: Server) -> float:
    """aetr_step_calls_apart_total as /metrics shows it (the counter is the test process's, shared by tests)."""
    async with aetr.http.get(f"{aetr.base_url}/metrics") as resp:
        assert resp.status == 200
        text = await resp.text()
    return sum(s.value for family in text_string_to_metric_families(text) for s in family.samples
               if s.name == "aetr_step_calls_apart_total")


def running_call_process(aetr: Server) -> int | None:
    apart = aetr.engine.dispatcher.apart
    return apart.pid if apart is not None else None


async def test_a_call_process_that_stops_answering_without_exiting_fails_its_calls_soon_after_their_time_out(
        svc: StepService, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(calls, "CHILD_GRACE_S", 0.5)
    svc.route("/ok", replying(202, b""))
    caller = ProcessCaller(4)
    await caller.start()
    stopped = caller.pid
    assert stopped is not None
    try:
        os.kill(stopped, signal.SIGSTOP)  # alive, but doing nothing
        started = asyncio.get_running_loop().time()
        with pytest.raises(CallFailed) as late:
            await asyncio.wait_for(call(caller, svc.url("/ok"), timeout_s=0.3), DEADLINE_S)
        assert late.value.kind == "timeout" and "call process" in str(late.value)
        assert asyncio.get_running_loop().time() - started < 0.3 + 0.5 + 2 * calls.SWEEP_S
    finally:
        os.kill(stopped, signal.SIGCONT)
        await caller.close()
