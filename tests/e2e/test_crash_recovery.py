"""A server killed with SIGKILL mid-flight loses nothing: restarted, it finishes every run exactly once."""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

from aetr.testing import Behaviour, StepRequest, StepService
from tests.e2e.harness import Api, Launcher, all_nodes

RUNS = 50
DONE_BEFORE_KILL = 5  # runs at least that have completed when the server is killed; the rest are mid-step
STEP_MIN_S = 0.05  # seconds a step takes at least to call back
STEP_MAX_S = 0.3  # seconds a step takes at most: each (run, step) draws its own, so the kill finds runs at every step
RETRY = {"max_attempts": 5, "backoff_s": 0.1, "max_backoff_s": 0.5}
TIMEOUT_S = 2  # a step's deadline: a callback lost with the server comes back as a retry after this
WAIT_S = 30.0  # seconds for the calls and completions the test waits for before the kill (a loaded runner is slow)
FINISH_TIMEOUT_S = 45.0  # seconds, after the restart, for every run to end

Step = Callable[[dict[str, Any]], dict[str, Any]]
STEPS: dict[str, Step] = {
    "triple": lambda x: {**x, "v": x["v"] * 3, "path": [*x["path"], "triple"]},
    "add-seven": lambda x: {**x, "v": x["v"] + 7, "path": [*x["path"], "add-seven"]},
    "double": lambda x: {**x, "v": x["v"] * 2, "path": [*x["path"], "double"]},
    "minus-four": lambda x: {**x, "v": x["v"] - 4, "path": [*x["path"], "minus-four"]},
    "quintuple": lambda x: {**x, "v": x["v"] * 5, "path": [*x["path"], "quintuple"]},
}
LAST_STEP = "quintuple"


def run_input(k: int) -> dict[str, Any]:
    return {"k": k, "v": k, "path": []}


def expected_output(k: int) -> dict[str, Any]:
    """What the pipeline must produce for run k: each step once, in order, on its predecessor's output."""
    return {"k": k, "v": ((3 * k + 7) * 2 - 4) * 5,
            "path": ["triple", "add-seven", "double", "minus-four", "quintuple"]}


def step_delay_s(k: int, step: str) -> float:
    """Seconds run k's `step` works before calling back: fixed per (run, step), so a failure can be replayed."""
    return random.Random(f"{k}/{step}").uniform(STEP_MIN_S, STEP_MAX_S)


@dataclass(eq=False)
class StepsSide:
    """The fake step services' side of the crash: which calls were held, which callbacks were lost."""

    held_k: int  # this run's first call gets no answer until the server is dead: it dies holding the lease
    late_k: int  # this run's first step calls back only once the server is dead: its callback is lost
    lost: list[tuple[str, int, float]] = field(default_factory=list)  # (node id, attempt, monotonic time)
    # Sent before the kill and cut by it, AETR may or may not have it: (node id, attempt, what went wrong).
    cut: list[tuple[str, int, str]] = field(default_factory=list)
    held: str | None = None  # node ids of the held call and of the late one
    late: str | None = None
    both_came: asyncio.Event = field(default_factory=asyncio.Event)
    server_dead: asyncio.Event = field(default_factory=asyncio.Event)
    owed: int = 0  # callbacks scheduled and not yet sent (or failed)
    settled: asyncio.Event = field(default_factory=asyncio.Event)

    def behaviour(self, name: str, fn: Step) -> Behaviour:
        """Answer 202, work for the step's time in this run, then call back with fn(input)."""

        async def work_then_call_back(request: StepRequest, late: bool) -> None:
            after_kill = False
            try:
                if late:
                    await self.server_dead.wait()
                else:
                    await asyncio.sleep(step_delay_s(request.input["k"], name))
                after_kill = self.server_dead.is_set()
                await request.send_output(fn(request.input))
            except aiohttp.ClientError as exc:
                # Sent once the server was dead, a callback is surely lost (refused, or on a pooled connection
                # the kill closed); one already on its way when it died may or may not have been committed.
                assert request.call.node_id is not None and request.call.attempt is not None
                if after_kill:
                    self.lost.append((request.call.node_id, request.call.attempt, time.monotonic()))
                else:
                    self.cut.append((request.call.node_id, request.call.attempt, f"{type(exc).__name__}: {exc}"))
            finally:
                self.owed -= 1
                if self.owed == 0:
                    self.settled.set()

        async def behaviour(request: StepRequest) -> web.StreamResponse:
            k = request.input["k"]
            if self.held is None and k == self.held_k:
                self.held = request.call.node_id
                self._check_both_came()
                await self.server_dead.wait()
                return web.Response(status=202)  # to a dead connection: for AETR this call was never answered
            late = self.late is None and k == self.late_k
            if late:
                self.late = request.call.node_id
                self._check_both_came()
            self.owed += 1
            self.settled.clear()
            request.later(work_then_call_back(request, late))
            return web.Response(status=202)

        return behaviour

    def _check_both_came(self) -> None:
        if self.held is not None and self.late is not None:
            self.both_came.set()


async def test_a_server_killed_mid_flight_and_restarted_completes_every_run_exactly_once(
        launcher: Launcher, database_url: str, http: aiohttp.ClientSession) -> None:
    side = StepsSide(held_k=RUNS - 1, late_k=RUNS - 2)
    async with StepService() as svc:
        for name, fn in STEPS.items():
            svc.route(f"/{name}", side.behaviour(name, fn))
        aetr = await launcher.serve(database_url)
        api = Api(http, aetr.url)
        for name in STEPS:
            await api.put_step({"name": name, "kind": "api", "url": svc.url(f"/{name}"),
                                "timeout_s": TIMEOUT_S, "retry": RETRY})
        await api.put_step({"name": "chain", "kind": "sequential", "children": [{"step": n} for n in STEPS]})
        run_ids = await asyncio.gather(*(api.start_run("chain", run_input(k)) for k in range(RUNS)))

        async with asyncio.timeout(WAIT_S):
            await side.both_came.wait()
        # The last step's callback being accepted is a run completing.
        await svc.wait_for_callback_answers(f"/{LAST_STEP}", DONE_BEFORE_KILL, timeout=WAIT_S)
        aetr.kill()
        killed_at = time.monotonic()
        done_at_kill = len(svc.callback_answers(f"/{LAST_STEP}"))
        side.server_dead.set()
        # Every callback the steps still owe now goes to the dead server (and is lost), or was on its way.
        async with asyncio.timeout(WAIT_S):
            await side.settled.wait()
        await aetr.start_ready()  # same port (so the same callback URLs), same database

        runs = await asyncio.gather(*(api.wait_run(run_id, FINISH_TIMEOUT_S) for run_id in run_ids))
        histories = await asyncio.gather(*(api.events(run_id) for run_id in run_ids))

    # The kill found most runs mid-way, not at the end: what follows is a test of recovery at scale.
    assert done_at_kill < RUNS // 2, f"{done_at_kill} of {RUNS} runs had completed when the server was killed"
    for k, run in enumerate(runs):
        assert run["state"] == "complete" and run["output"] == expected_output(k), run
    api_node_ids = set()
    for run, history in zip(runs, histories, strict=True):
        nodes = all_nodes(run)
        assert all(n["state"] == "complete" for n in nodes), run
        api_node_ids |= {n["id"] for n in nodes if n["step"]["kind"] == "api"}
        accepted = Counter(e["node_id"] for e in history
                           if e["kind"] == "callback" and e["data"].get("outcome") == "accepted")
        completed = Counter(e["node_id"] for e in history
                            if e["kind"] == "state" and e["data"].get("to") == "complete")
        for node in nodes:
            expected = 1 if node["step"]["kind"] == "api" else 0
            assert accepted[node["id"]] == expected, (node["step"]["name"], node["id"], history)
            assert completed[node["id"]] == 1, (node["step"]["name"], node["id"], history)

    # Both calls whose outcome the dead server never heard were made again: the one it was waiting on when
    # it died (its lease expires, or its deadline passes), and the one whose callback hit the dead port.
    # "Again" is a later attempt, or the same attempt after the loss (a re-dispatch once the lease expired).
    def made_again(node_id: str | None, attempt: int, since: float) -> bool:
        return any(c.node_id == node_id and ((c.attempt or 0) > attempt or c.received_at > since)
                   for c in svc.calls())

    assert made_again(side.held, 1, killed_at), f"node {side.held}: its unanswered call was never made again"
    (late,) = [(attempt, at) for node_id, attempt, at in side.lost if node_id == side.late]
    assert made_again(side.late, *late), f"node {side.late}: its callback was lost and it was never called again"
    # So was every other call whose callback the kill lost; one cut on its way was either taken or made again.
    for node_id, attempt, at in side.lost:
        assert made_again(node_id, attempt, at), f"node {node_id}: its callback was lost and it was never called again"
    taken = {(e["node_id"], e["data"]["attempt"]) for history in histories for e in history
             if e["kind"] == "callback" and e["data"].get("outcome") == "accepted"}
    for node_id, attempt, error in side.cut:
        assert (node_id, attempt) in taken or made_again(node_id, attempt, killed_at), (
            f"node {node_id}: its callback was cut by the kill ({error}), not taken, and it was never called again")
    # The step service saw each step of each run at least once, and only steps of these runs.
    assert {c.node_id for c in svc.calls()} == api_node_ids
    assert svc.errors == [], svc.errors


UNMADE_RUNS = 100
UNMADE_LEASE_S = 60  # the default lease: waiting it out would take longer than the test allows
UNMADE_FINISH_S = 30.0  # seconds after the restart for every run to end: well under the lease


async def test_calls_committed_but_not_made_when_killed_are_made_at_once_after_a_restart(
        launcher: Launcher, database_url: str, http: aiohttp.ClientSession) -> None:
    async def inc(request: StepRequest) -> web.StreamResponse:
        await asyncio.sleep(0.05)  # the step's own work: calls queue behind the few in flight
        return web.json_response(request.input + 1)

    async with StepService() as svc:
        svc.route("/inc", inc)
        # Four calls at a time: when the server is killed most calls it committed are still waiting to be made.
        aetr = await launcher.serve(database_url, env={"AETR_LEASE_S": str(UNMADE_LEASE_S), "AETR_MAX_IN_FLIGHT": "4"})
        api = Api(http, aetr.url)
        # A deadline shorter than the restart: it must count from the call, which the dead server never made.
        await api.put_step({"name": "inc", "kind": "api", "url": svc.url("/inc"), "mode": "sync", "timeout_s": 1,
                            "retry": {"max_attempts": 1}})
        await api.put_step({"name": "chain", "kind": "sequential", "children": [{"step": "inc"}] * 3})
        run_ids = await asyncio.gather(*(api.start_run("chain", k) for k in range(UNMADE_RUNS)))
        await svc.wait_for_calls("/inc", 20, timeout=WAIT_S)
        aetr.kill()
        made_before_kill = len(svc.calls("/inc"))
        await aetr.start_ready()
        runs = await asyncio.gather(*(api.wait_run(run_id, UNMADE_FINISH_S) for run_id in run_ids))

    assert made_before_kill < UNMADE_RUNS, "the kill came after every first call was made: nothing was tested"
    ended = Counter((run["state"], (run["error"] or {}).get("kind")) for run in runs)
    assert ended == {("complete", None): UNMADE_RUNS}, ended
    assert [run["output"] for run in runs] == [k + 3 for k in range(UNMADE_RUNS)]
