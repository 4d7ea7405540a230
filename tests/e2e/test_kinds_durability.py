"""Wait steps and `max_concurrency` hold up against SIGKILL and several processes on one database.

Timers and signal time-outs are work rows, and slots are node columns counted under a lock: a timer armed
before a kill fires after the restart, one timer fires once however many processes share the database, a
signal is taken by any process (once), and a step's slots are never exceeded across processes, also when
one of them dies holding some.
"""

from __future__ import annotations

import asyncio
import random
import sqlite3
import time
from collections import Counter
from collections.abc import Iterable
from contextlib import closing
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import asyncpg
import pytest
from aiohttp import web

from aetr.testing import Call, StepRequest, StepService
from aetr.testing.behaviours import sync
from tests.e2e.harness import TERMINAL, Api, Launcher, nodes_by_name
from tests.e2e.test_scale_out import distinct_ports, port_of, start_cluster

ON_POSTGRES = pytest.mark.parametrize(
    "database_url", [pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True)

PROCESSES = 3
FINISH_S = 45.0  # seconds for every run of a test to end once nothing holds them up
POLL_RUNS_S = 0.2  # seconds between two looks at the runs' states


async def wait_all_ended(api: Api, run_ids: Iterable[str], timeout: float) -> dict[str, str]:  # noqa: ASYNC109
    """Poll the run list until every one of `run_ids` has ended; their states. Fails after `timeout` seconds
    with the states seen last (one list request per look, not a long poll per run: the connections are few)."""
    wanted = set(run_ids)
    deadline = time.monotonic() + timeout
    while True:
        status, body = await api.call("GET", f"/api/v1/runs?limit={len(wanted) + 50}")
        assert status == 200, f"GET /runs: HTTP {status} {body}"
        states = {r["id"]: r["state"] for r in body["runs"] if r["id"] in wanted}
        if len(states) == len(wanted) and all(s in TERMINAL for s in states.values()):
            return states
        assert time.monotonic() < deadline, (
            f"runs not ended after {timeout:g} s: {Counter(states.values())}, {len(wanted) - len(states)} not listed")
        await asyncio.sleep(POLL_RUNS_S)


def completions(history: list[dict[str, Any]]) -> Counter[str]:
    """How many times each node of a run's history moved to `complete`."""
    return Counter(e["node_id"] for e in history if e["kind"] == "state" and e["data"].get("to") == "complete")


def count_calls(calls: list[Call]) -> Counter[str]:
    """Calls per run id."""
    return Counter(c.run_id for c in calls if c.run_id is not None)


# ---- 1. a timer armed before SIGKILL fires after the restart, once ----------------------------------------

KILL_RUNS = 20
KILL_WAIT_S = 6  # long enough that 20 starts and 20 reads end before a timer fires, also on a loaded machine


async def test_timers_armed_before_a_sigkill_fire_once_after_the_restart(
        launcher: Launcher, database_url: str, http: aiohttp.ClientSession) -> None:
    async with StepService() as svc:
        svc.route("/after", sync(lambda x: {**x, "after": True}))
        aetr = await launcher.serve(database_url)
        api = Api(http, aetr.url)
        await api.put_step({"name": "after", "kind": "api", "url": svc.url("/after"), "mode": "sync",
                            "timeout_s": 5, "retry": {"max_attempts": 3, "backoff_s": 0.1}})
        await api.put_step({"name": "pause", "kind": "wait", "seconds": KILL_WAIT_S})
        await api.put_step({"name": "pause-then-call", "kind": "sequential",
                            "children": [{"step": "pause"}, {"step": "after"}]})
        started_at = time.monotonic()
        run_ids = list(await asyncio.gather(*(api.start_run("pause-then-call", {"k": k})
                                              for k in range(KILL_RUNS))))
        # Every wait has armed its timer (the node waits with a time to wake at) before the kill.
        for run in await asyncio.gather(*(api.run(run_id) for run_id in run_ids)):
            pause = nodes_by_name(run)["pause"]
            assert pause["state"] == "executing", pause
        aetr.kill()
        killed_after = time.monotonic() - started_at
        assert svc.calls() == [], "a timer fired before the kill: the kill came too late to test anything"
        assert killed_after < KILL_WAIT_S, f"the kill came {killed_after:.1f} s after the first start"

        await aetr.start_ready()
        states = await wait_all_ended(api, run_ids, FINISH_S)
        runs = [await api.run(run_id) for run_id in run_ids]
        histories = [await api.events(run_id) for run_id in run_ids]

    assert Counter(states.values()) == {"complete": KILL_RUNS}, states
    calls = count_calls(svc.calls("/after"))
    assert calls == dict.fromkeys(run_ids, 1), f"api step calls per run: {calls}"
    for k, (run, history) in enumerate(zip(runs, histories, strict=True)):
        assert run["output"] == {"k": k, "after": True}, run
        nodes = nodes_by_name(run)
        assert completions(history) == {n["id"]: 1 for n in nodes.values()}, history
    # The timers waited their time: no call came sooner than KILL_WAIT_S after its run was started.
    assert min(c.received_at for c in svc.calls()) - started_at >= KILL_WAIT_S - 0.2


# ---- 2. one timer fires once with several processes on one PostgreSQL -------------------------------------

MANY_RUNS = 60
SHORT_WAIT_S = 1


@ON_POSTGRES
async def test_timers_fire_exactly_once_with_three_processes_on_one_database(
        launcher: Launcher, database_url: str, http: aiohttp.ClientSession) -> None:
    ports = distinct_ports(PROCESSES)
    async with StepService() as svc:
        svc.route("/after", sync(lambda x: {**x, "after": True}))
        await start_cluster(launcher, database_url, ports, "s" * 43)
        apis = [Api(http, f"http://127.0.0.1:{p}") for p in ports]
        await apis[0].put_step({"name": "after", "kind": "api", "url": svc.url("/after"), "mode": "sync",
                                "timeout_s": 10, "retry": {"max_attempts": 3, "backoff_s": 0.1}})
        await apis[0].put_step({"name": "pause", "kind": "wait", "seconds": SHORT_WAIT_S})
        await apis[0].put_step({"name": "pause-then-call", "kind": "sequential",
                                "children": [{"step": "pause"}, {"step": "after"}]})
        run_ids = list(await asyncio.gather(*(apis[k % PROCESSES].start_run("pause-then-call", {"k": k})
                                              for k in range(MANY_RUNS))))
        states = await wait_all_ended(apis[1], run_ids, FINISH_S)
        runs = [await apis[k % PROCESSES].run(run_id) for k, run_id in enumerate(run_ids)]
        histories = [await apis[k % PROCESSES].events(run_id) for k, run_id in enumerate(run_ids)]

    assert Counter(states.values()) == {"complete": MANY_RUNS}, states
    calls = count_calls(svc.calls("/after"))
    assert calls == dict.fromkeys(run_ids, 1), f"api step calls per run: {calls}"
    for k, (run, history) in enumerate(zip(runs, histories, strict=True)):
        assert run["state"] == "complete" and run["output"] == {"k": k, "after": True}, run
        nodes = nodes_by_name(run)
        assert completions(history)[nodes["pause"]["id"]] == 1, history
        assert completions(history) == {n["id"]: 1 for n in nodes.values()}, history


# ---- 3. a signal sent through another process is taken once ---------------------------------------------

@ON_POSTGRES
async def test_a_signal_wait_started_on_one_process_is_answered_through_another_and_only_once(
        launcher: Launcher, database_url: str, http: aiohttp.ClientSession) -> None:
    ports = distinct_ports(PROCESSES)
    await start_cluster(launcher, database_url, ports, "s" * 43)
    a, b, c = (Api(http, f"http://127.0.0.1:{p}") for p in ports)
    await a.put_step({"name": "approval", "kind": "wait", "signal": True, "timeout_s": 60})
    run_id = await a.start_run("approval", {"asked": True})
    run = await a.run(run_id)
    assert run["state"] == "executing", run
    path = f"/api/v1/runs/{run_id}/nodes/{run['id']}/signal"

    status, body = await b.call("POST", path, {"output": {"approved": True}})
    assert status == 200, (status, body)
    ended = await a.wait_run(run_id, FINISH_S)
    assert ended["state"] == "complete" and ended["output"] == {"approved": True}, ended

    status, body = await c.call("POST", path, {"error": "too late"})
    assert status == 409, (status, body)
    status, body = await a.call("POST", path, {"output": {"approved": False}})
    assert status == 409, (status, body)
    after = await c.run(run_id)
    assert after["state"] == "complete" and after["output"] == {"approved": True}, after
    assert completions(await c.events(run_id)) == {run_id: 1}


# ---- 4. max_concurrency across processes, and across a kill ----------------------------------------------

LIMIT = 5
LIMITED_RUNS = 60
HOLD_S = (0.3, 0.5)  # seconds the step service works on each call before it calls back
LIMITED_TIMEOUT_S = 3  # a lost callback's attempt fails after this, freeing its slot, and is retried
LIMITED_RETRY = {"max_attempts": 4, "backoff_s": 0.1, "max_backoff_s": 0.5}
KILL_AFTER_DONE = 15  # calls called back when one process is killed
RECORDED_S = 0.15  # seconds after its 202 by which a process has surely recorded a call as made


@dataclass(eq=False)
class LimitedService:
    """The limited step's service: counts the calls it is working on, and calls back the process that minted
    each call's callback URL (a dead one's callbacks are lost)."""

    rng: random.Random
    in_flight: int = 0
    most: int = 0
    done: int = 0
    dead: set[int] = field(default_factory=set)
    lost: list[Call] = field(default_factory=list)  # callbacks that met a dead process
    # The calls being worked on right now: (node id, attempt) -> (port of their process, when answered 202).
    out: dict[tuple[str | None, int | None], tuple[int, float]] = field(default_factory=dict)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    at_most: list[tuple[str | None, int | None]] = field(default_factory=list)  # the calls out at the peak
    peak_at: float = 0.0

    async def behaviour(self, request: StepRequest) -> web.StreamResponse:
        self.in_flight += 1
        if self.in_flight > self.most:
            self.most = self.in_flight
            self.at_most = [*self.out, (request.call.node_id, request.call.attempt)]
            self.peak_at = time.monotonic()
        self.out[request.call.node_id, request.call.attempt] = (port_of(request.call), time.monotonic())
        self.changed.set()
        request.later(self._work(request))
        return web.Response(status=202)

    async def _work(self, request: StepRequest) -> None:
        try:
            await asyncio.sleep(self.rng.uniform(*HOLD_S))
        finally:
            # The work is over before its callback is sent: a slot is never freed before this, so this count
            # never exceeds the slots AETR holds.
            self.in_flight -= 1
            self.out.pop((request.call.node_id, request.call.attempt), None)
        if port_of(request.call) in self.dead:
            self.lost.append(request.call)
            return
        try:
            answer = await request.send_output({**request.input, "limited": True})
        except aiohttp.ClientError:
            self.lost.append(request.call)  # it died while this was on its way: AETR may not have it
            return
        if answer.status == 200 and answer.json == {"accepted": True}:
            self.done += 1
        self.changed.set()

    async def wait_for(self, what: str, condition: Any, timeout: float) -> None:  # noqa: ASYNC109
        deadline = time.monotonic() + timeout
        while not condition():
            left = deadline - time.monotonic()
            assert left > 0, f"not {what} after {timeout:g} s: in flight {self.in_flight}, done {self.done}"
            self.changed.clear()
            try:
                async with asyncio.timeout(min(left, 0.02)):  # conditions on time are looked at again soon
                    await self.changed.wait()
            except TimeoutError:
                pass


async def _limited_scenario(launcher: Launcher, database_url: str, http: aiohttp.ClientSession,
                            kill: bool, processes: int = PROCESSES, restart: bool = False,
                            ) -> tuple[LimitedService, list[dict[str, Any]], list[list[dict[str, Any]]], list[Call],
                                       float]:
    """LIMITED_RUNS runs of the limited step started round-robin on `processes` processes; with `kill`, one of
    them is killed mid-way (and with `restart`, started again on its port once its calls' callbacks are lost)."""
    ports = distinct_ports(processes)
    seed = random.randrange(2**32)
    service = LimitedService(random.Random(seed))
    async with StepService() as svc:
        svc.route("/limited", service.behaviour)
        servers = await start_cluster(launcher, database_url, ports, "s" * 43)
        apis = [Api(http, server.url) for server in servers]
        await apis[0].put_step({"name": "limited", "kind": "api", "url": svc.url("/limited"),
                                "max_concurrency": LIMIT, "timeout_s": LIMITED_TIMEOUT_S, "retry": LIMITED_RETRY})
        run_ids = list(await asyncio.gather(*(apis[k % processes].start_run("limited", {"k": k})
                                              for k in range(LIMITED_RUNS))))
        killed_at = 0.0
        survivors = apis
        if kill:
            # Mid-way, the process that made the call worked on longest is killed: answered long enough ago that
            # it has recorded the call as made, so the call's callback is lost and only its deadline can end it.
            def recorded_call_out() -> int | None:
                now = time.monotonic()
                ports_out = [(at, port) for port, at in service.out.values() if now - at >= RECORDED_S]
                return min(ports_out)[1] if ports_out else None

            await service.wait_for("mid-way with a recorded call out",
                                   lambda: service.done >= KILL_AFTER_DONE and recorded_call_out(), FINISH_S)
            victim = ports.index(recorded_call_out() or 0)
            servers[victim].kill()
            killed_at = time.monotonic()
            service.dead.add(ports[victim])
            if restart:
                # Back once every call it had out has lost its callback (it was dead when they were done).
                await service.wait_for("the dead process's calls done", lambda: not service.out, FINISH_S)
                service.dead.clear()
                await servers[victim].start_ready()
            else:
                survivors = [api for i, api in enumerate(apis) if i != victim]
        await wait_all_ended(survivors[0], run_ids, FINISH_S)
        # Every attempt has ended: no slot is left held (the API does not show slots; the database does).
        held = await slots_held(database_url)
        assert held == 0, f"{held} slot(s) still held after every run ended"
        runs = [await survivors[k % len(survivors)].run(run_id) for k, run_id in enumerate(run_ids)]
        histories = [await survivors[k % len(survivors)].events(run_id) for k, run_id in enumerate(run_ids)]
        assert svc.errors == [], svc.errors
        calls = svc.calls("/limited")
    print(f"\nmax_concurrency {LIMIT}: most in flight {service.most} ({service.peak_at - killed_at:.2f} s after the "
          f"kill), lost callbacks {len(service.lost)}, "
          f"calls {len(calls)}, seed {seed}")
    return service, runs, histories, calls, killed_at


async def slots_held(database_url: str) -> int:
    """How many nodes hold a slot of their step, and (PostgreSQL) slot rows are held, as the database says."""
    query = "SELECT count(*) FROM run_nodes WHERE holds_slot"
    if database_url.startswith("sqlite:///"):
        with closing(sqlite3.connect(database_url.removeprefix("sqlite:///"))) as db:
            return int(db.execute(query).fetchone()[0])
    conn = await asyncpg.connect(database_url, timeout=5)
    try:
        # PostgreSQL keeps its slots as rows too: none may be left held by an attempt that ended.
        rows = await conn.fetchval("SELECT count(*) FROM step_slots WHERE holder_id IS NOT NULL")
        return int(await conn.fetchval(query)) + int(rows)
    finally:
        await conn.close()


def _check_limited(service: LimitedService, runs: list[dict[str, Any]], histories: list[list[dict[str, Any]]]) -> None:
    peak = {node_id for node_id, _ in service.at_most}
    assert service.most <= LIMIT, (
        f"{service.most} calls of a step with max_concurrency {LIMIT} were in flight: (node, attempt) "
        f"{service.at_most}; their histories: "
        f"{[e for history in histories for e in history if e['node_id'] in peak]}")
    # The limit was reached: the runs queued for slots (without the limit, dozens would be in flight).
    assert service.most == LIMIT, f"at most {service.most} in flight: the limit was never reached"
    ended = Counter((run["state"], (run["error"] or {}).get("kind")) for run in runs)
    assert ended == {("complete", None): LIMITED_RUNS}, ended
    for k, (run, history) in enumerate(zip(runs, histories, strict=True)):
        assert run["output"] == {"k": k, "limited": True}, run
        assert completions(history) == {run["id"]: 1}, history


@ON_POSTGRES
async def test_max_concurrency_holds_across_three_processes(
        launcher: Launcher, database_url: str, http: aiohttp.ClientSession) -> None:
    service, runs, histories, _, _ = await _limited_scenario(launcher, database_url, http, kill=False)
    _check_limited(service, runs, histories)
    assert service.lost == []


@ON_POSTGRES
async def test_max_concurrency_holds_when_a_process_is_killed_holding_slots(
        launcher: Launcher, database_url: str, http: aiohttp.ClientSession) -> None:
    service, runs, histories, calls, killed_at = await _limited_scenario(launcher, database_url, http, kill=True)
    _check_limited(service, runs, histories)
    # Some calls died with the victim (their callbacks lost) while their attempts held slots. Each was made
    # again by a survivor: the same attempt once the victim's lease on its dispatch expired (the victim died
    # before recording the call), or the next attempt once its deadline failed the attempt and freed its slot.
    assert service.lost, "no callback was lost with the victim: its slots were never tested"
    timed_out = {(e["node_id"], e["data"]["attempt"]) for history in histories for e in history
                 if e["kind"] == "timeout"}
    for lost in service.lost:
        again = [(c.attempt, round(c.received_at - killed_at, 2)) for c in calls
                 if c.node_id == lost.node_id and c.received_at > killed_at and port_of(c) != port_of(lost)]
        assert again, f"node {lost.node_id}: its call died with the victim and was never made again"
        how = "timed out, then retried" if (lost.node_id, lost.attempt) in timed_out else "re-dispatched"
        print(f"lost attempt {lost.attempt} of {lost.node_id}: {how}; made again (attempt, s after the kill) {again}")
    assert any((lost.node_id, lost.attempt) in timed_out for lost in service.lost), (
        "no lost attempt timed out: no slot was freed by a deadline")


# A call re-made at the restart whose deadline passed while the process was down once had its attempt timed
# out at once, which freed its slot while the step service still worked on it (6 calls in flight for 5 slots,
# about one run in eight): deadlines of late calls now count from the call.
async def test_max_concurrency_holds_across_a_kill_and_restart_of_the_only_process(
        launcher: Launcher, database_url: str, http: aiohttp.ClientSession) -> None:
    service, runs, histories, calls, killed_at = await _limited_scenario(
        launcher, database_url, http, kill=True, processes=1, restart=True)
    _check_limited(service, runs, histories)
    # The calls out when it died lost their callbacks; their attempts, holding slots, timed out after the
    # restart and were made again: the slots came back.
    assert service.lost, "no callback was lost with the process: its slots were never tested"
    timed_out = {(e["node_id"], e["data"]["attempt"]) for history in histories for e in history
                 if e["kind"] == "timeout"}
    for lost in service.lost:
        again = [c.attempt for c in calls if c.node_id == lost.node_id and c.received_at > killed_at]
        assert again, f"node {lost.node_id}: its call died with the process and was never made again"
    assert any((lost.node_id, lost.attempt) in timed_out for lost in service.lost), (
        "no lost attempt timed out: no slot was freed by a deadline")


# ---- a deadline that passed while its call was still to be made ----------------------------------------------

OVERDUE_RUNS = 30
OVERDUE_TIMEOUT_S = 2


async def test_a_call_made_after_a_restart_gets_its_whole_timeout_though_its_deadline_passed_while_down(
        launcher: Launcher, database_url: str, http: aiohttp.ClientSession) -> None:
    """Calls committed but not made when the process died are made after the restart, and their deadlines,
    which passed while it was down, count from those calls (`reliability.md`): none of them times out."""
    down = asyncio.Event()

    async def answer(request: StepRequest) -> web.StreamResponse:
        if not down.is_set():
            await down.wait()  # the first call hangs until the process dies: the others stay queued behind it
            return web.Response(status=202)
        async def call_back() -> None:
            await asyncio.sleep(0.2)
            await request.send_output({**request.input, "done": True})
        request.later(call_back())
        return web.Response(status=202)

    async with StepService() as svc:
        svc.route("/slowly", answer)
        aetr = await launcher.serve(database_url, env={"AETR_MAX_IN_FLIGHT": "1"})
        api = Api(http, aetr.url)
        await api.put_step({"name": "slowly", "kind": "api", "url": svc.url("/slowly"),
                            "timeout_s": OVERDUE_TIMEOUT_S, "retry": {"max_attempts": 1}})
        run_ids = [await api.start_run("slowly", {"k": k}) for k in range(OVERDUE_RUNS)]
        await svc.wait_for_calls("/slowly", 1, timeout=FINISH_S)
        aetr.kill()
        down.set()
        made_before = len(svc.calls())
        # Down for longer than the timeout: every deadline is overdue when the process comes back.
        await asyncio.sleep(OVERDUE_TIMEOUT_S + 0.5)
        await aetr.start_ready()
        states = await wait_all_ended(api, run_ids, FINISH_S)
        histories = [await api.events(run_id) for run_id in run_ids]

    assert made_before < OVERDUE_RUNS // 2, f"{made_before} calls were made before the kill: nothing was queued"
    # (when the call was made, when its attempt timed out) of every attempt that timed out
    early = [([d["at"] for d in history if d["kind"] == "dispatch"], e["at"]) for history in histories
             for e in history if e["kind"] == "timeout"]
    assert Counter(states.values()) == {"complete": OVERDUE_RUNS}, (Counter(states.values()), early[:5])
