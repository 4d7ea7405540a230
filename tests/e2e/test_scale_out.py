"""Several `aetr serve` processes share one PostgreSQL database.

Three processes, each with its own AETR_PUBLIC_URL, run 200 runs together. A "load balancer" in front of
them (played by the fake step service) posts each callback to any of the three, whichever minted it. One
process is killed with SIGKILL while holding calls it had claimed; the other two finish everything,
including those calls, once its 1 s lease has expired. Every run completes once, with the right output, and
every step's callback is accepted exactly once.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import secrets
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import orjson
import pytest
from aiohttp import web

from aetr.testing import Behaviour, Call, StepRequest, StepService, never
from tests.e2e.harness import AetrServer, Api, Launcher, all_nodes, free_port

# PostgreSQL only: the conftest's fixture makes a fresh database for each test.
pytestmark = pytest.mark.parametrize(
    "database_url", [pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True)

PROCESSES = 3
RUNS = 200
VICTIM = 1  # index of the process that is killed
KILL_AFTER_DONE = RUNS // 3  # runs complete when the victim starts being starved of answers, then killed
HELD_TARGET = 2  # calls of the victim held unanswered when it is killed: it dies holding their leases
LEASE_S = "1"  # AETR_LEASE_S: the dead process's claimed calls are taken over after this
POLL_S = "0.2"  # AETR_POLL_S
STEP_TIMEOUT_S = 600  # a step's deadline never passes in this test: only the lease can recover a held call
RETRY = {"max_attempts": 3, "backoff_s": 0.2, "max_backoff_s": 1.0}
STEP_DELAY_S = (0.05, 0.4)  # seconds a step works before it calls back (random, spreads the runs out)
# The connection budget. PostgreSQL's default max_connections is 100, and other test runs and benchmarks
# share the server (one `aetr serve` alone may hold 40: its pool). A process opens one connection per
# concurrent transaction and keeps up to 20 open, so each process here gets a bounded load, as behind a real
# balancer: at most MAX_IN_FLIGHT calls of its own and BALANCER_CONNECTIONS callbacks at once, plus the
# test's few requests. Measured: about 40 connections for the three processes together.
MAX_IN_FLIGHT = "5"  # AETR_MAX_IN_FLIGHT
BALANCER_CONNECTIONS = 3  # the balancer's connections per process
START_CONCURRENCY = 3  # runs being started at once
READ_CONCURRENCY = 3  # runs and histories read at once at the end
CALLBACK_TRIES = 6  # a callback that meets a dead or closing connection is tried on another process
CALLBACK_HTTP_TIMEOUT_S = 30.0
OVERALL_S = 180.0  # the whole test, servers' start included: a hang fails with the progress so far
WAIT_S = 60.0  # seconds for the few calls of the generated-key test
POLL_RUNS_S = 0.5  # seconds between two looks at the runs' states while the survivors finish
JSON_HEADERS = {"Content-Type": "application/json"}

Step = Callable[[dict[str, Any]], dict[str, Any]]
STEPS: dict[str, Step] = {
    "scale-a": lambda x: {**x, "v": x["v"] + 1, "path": [*x["path"], "a"]},
    "scale-b": lambda x: {**x, "v": x["v"] * 2, "path": [*x["path"], "b"]},
    "scale-c": lambda x: {**x, "v": x["v"] + 3, "path": [*x["path"], "c"]},
    "scale-d": lambda x: {**x, "v": x["v"] - 5, "path": [*x["path"], "d"]},
}
LAST_STEP = "scale-d"  # its accepted callback is its run completing
C_MAPPER = "(x, ctx) => ({...x, v: x.v * 10 + ctx.index})"  # ctx.index: c is the parallel's child 1
D_MAPPER = ("(outs, ctx) => ({k: ctx.run.input.k, v: outs[0].v * 1000 + outs[1].v,"
            " path: [...outs[0].path, ...outs[1].path]})")
TREE = {"name": "scale", "kind": "sequential", "children": [
    {"step": "scale-a"},
    {"step": {"name": "scale-fan", "kind": "parallel",
              "children": [{"step": "scale-b"}, {"step": "scale-c", "mapper": C_MAPPER}]}},
    {"step": "scale-d", "mapper": D_MAPPER}]}


def run_input(k: int) -> dict[str, Any]:
    return {"k": k, "v": k, "path": []}


def expected_output(k: int) -> dict[str, Any]:
    """sequential[a, parallel[b, c∘mapper], d∘mapper] on run k's input, each step once."""
    a = k + 1
    b, c = 2 * a, (10 * a + 1) + 3
    return {"k": k, "v": (1000 * b + c) - 5, "path": ["a", "b", "a", "c", "d"]}


def distinct_ports(n: int) -> list[int]:
    ports: list[int] = []
    while len(ports) < n:
        if (port := free_port()) not in ports:
            ports.append(port)
    return ports


def callback_url(call: Call) -> str:
    url = call.callback_url
    assert url is not None, f"a call to {call.path} without a callback URL"
    return url


def port_of(call: Call) -> int:
    """The port of the process that minted the call's callback URL."""
    port = urlsplit(callback_url(call)).port
    assert port is not None, call.callback_url
    return port


@dataclass(frozen=True)
class Delivery:
    """One callback the balancer delivered: to which process, and what it answered."""

    node_id: str
    attempt: int
    minted_by: int  # the port in the callback URL AETR gave
    posted_to: int  # the port it was posted to
    status: int
    body: Any
    after_kill: bool


@dataclass(eq=False)
class Cluster:
    """The outside world of three AETR processes: the step services, and a load balancer for their callbacks.

    Each call is answered 202 and called back after a short random delay, on a random live process rather
    than the one that minted the callback URL (the token is the whole path: any process must take it). Once
    `holding` is set, calls made by the victim get no answer until it is dead, so it dies with them leased.
    """

    ports: list[int]
    victim: int
    rng: random.Random
    http: aiohttp.ClientSession
    dead: set[int] = field(default_factory=set)
    holding: bool = False
    held: list[Call] = field(default_factory=list)
    calls_per_node: Counter[str] = field(default_factory=Counter)
    enough_held: asyncio.Event = field(default_factory=asyncio.Event)
    victim_dead: asyncio.Event = field(default_factory=asyncio.Event)
    runs_done: int = 0  # accepted callbacks of the last step, as the balancer saw them
    third_done: asyncio.Event = field(default_factory=asyncio.Event)
    deliveries: list[Delivery] = field(default_factory=list)
    transport_errors: list[str] = field(default_factory=list)  # retried on another process
    errors: list[str] = field(default_factory=list)  # what must not happen: asserted empty

    def behaviour(self, name: str, fn: Step) -> Behaviour:
        async def answer(request: StepRequest) -> web.StreamResponse:
            call = request.call
            assert call.node_id is not None
            self.calls_per_node[call.node_id] += 1
            first = self.calls_per_node[call.node_id] == 1
            # Only a first call is held: a repeat (another process's lease lapsed under load) is answered, so
            # that the victim dies holding work that nobody else has.
            if self.holding and first and port_of(call) == self.victim and not self.victim_dead.is_set():
                self.held.append(call)
                if len(self.held_alone()) >= HELD_TARGET:
                    self.enough_held.set()
                await self.victim_dead.wait()
                return web.Response(status=202)  # to a dead connection: the victim never heard an answer
            request.later(self._work_then_call_back(name, call, fn))
            return web.Response(status=202)

        return answer

    def held_alone(self) -> list[Call]:
        """The held calls that nobody has made again so far: only the victim's lease stands for them."""
        return [c for c in self.held if c.node_id is not None and self.calls_per_node[c.node_id] == 1]

    def release(self) -> None:
        """Let held calls answer (the service waits for its handlers when it closes)."""
        self.victim_dead.set()

    async def _work_then_call_back(self, name: str, call: Call, fn: Step) -> None:
        await asyncio.sleep(self.rng.uniform(*STEP_DELAY_S))
        await self._deliver(name, call, orjson.dumps(fn(call.json)))

    async def _deliver(self, name: str, call: Call, body: bytes) -> None:
        assert call.node_id is not None and call.attempt is not None
        minted_by = port_of(call)
        path = urlsplit(callback_url(call)).path
        tried: set[int] = set()
        for _ in range(CALLBACK_TRIES):
            live = [p for p in self.ports if p not in self.dead]
            port = self.rng.choice([p for p in live if p not in tried] or live)
            after_kill = self.victim_dead.is_set()
            try:
                async with self.http.post(f"http://127.0.0.1:{port}{path}", data=body, headers=JSON_HEADERS) as resp:
                    raw = await resp.read()
                    status = resp.status
            except (aiohttp.ClientError, TimeoutError) as exc:
                # The victim died under it, or a keep-alive connection closed: a balancer tries another one.
                self.transport_errors.append(f"{name} → :{port}: {type(exc).__name__}: {exc}")
                tried.add(port)
                await asyncio.sleep(0.05)
                continue
            try:
                answer = orjson.loads(raw) if raw else None
            except orjson.JSONDecodeError:
                answer = raw.decode(errors="replace")
            self.deliveries.append(Delivery(call.node_id, call.attempt, minted_by, port, status, answer, after_kill))
            if status != 200 or not isinstance(answer, dict):
                self.errors.append(f"callback of {name} node {call.node_id} attempt {call.attempt} "
                                   f"(minted by :{minted_by}) posted to :{port}: HTTP {status} {answer}")
            elif name == LAST_STEP and answer.get("accepted") is True:
                self.runs_done += 1
                if self.runs_done >= KILL_AFTER_DONE:
                    self.third_done.set()
            return
        self.errors.append(f"callback of {name} node {call.node_id} attempt {call.attempt} undeliverable "
                           f"after {CALLBACK_TRIES} tries: {self.transport_errors[-CALLBACK_TRIES:]}")


def server_env(port: int, secret: str | None) -> dict[str, str]:
    env = {"AETR_PUBLIC_URL": f"http://127.0.0.1:{port}", "AETR_LEASE_S": LEASE_S, "AETR_POLL_S": POLL_S,
           "AETR_MAX_IN_FLIGHT": MAX_IN_FLIGHT}
    if secret is not None:
        env["AETR_SECRET"] = secret
    return env


async def start_cluster(launcher: Launcher, database_url: str, ports: list[int],
                        secret: str | None) -> list[AetrServer]:
    """Start every process at once (they migrate the fresh database, and may race to make its key)."""
    return list(await asyncio.gather(*(launcher.serve(database_url, port=p, env=server_env(p, secret))
                                       for p in ports)))


@dataclass(frozen=True)
class Outcome:
    """What the scenario left to check."""

    servers: list[AetrServer]
    runs: list[dict[str, Any]]
    histories: list[list[dict[str, Any]]]
    calls: list[Call]  # every request the step services received
    killed_at: float
    done_at_kill: int
    held_alone: list[Call]  # the victim's held calls that no other process had made when it was killed
    marks: dict[str, float]  # when each phase ended (time.monotonic())
    retried_starts: list[str]  # starts cut by the kill (or a closing connection), made again elsewhere


async def test_three_processes_share_the_runs_and_finish_a_killed_ones_work(
        launcher: Launcher, database_url: str, http: aiohttp.ClientSession) -> None:
    began = time.monotonic()
    seed = random.randrange(2**32)
    ports = distinct_ports(PROCESSES)
    phase = ["starting the servers"]  # what the scenario is doing: a hang reports it
    cluster: Cluster | None = None
    try:
        async with asyncio.timeout(OVERALL_S), StepService() as svc, aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit_per_host=BALANCER_CONNECTIONS),
                timeout=aiohttp.ClientTimeout(total=CALLBACK_HTTP_TIMEOUT_S)) as balancer_http:
            cluster = Cluster(ports, ports[VICTIM], random.Random(seed), balancer_http)
            try:
                out = await _scenario(launcher, database_url, http, svc, cluster, phase)
            finally:
                cluster.release()
    except TimeoutError:
        seen = "" if cluster is None else (
            f"; runs done (as the balancer saw) {cluster.runs_done}, calls held {len(cluster.held)}, "
            f"callbacks delivered {len(cluster.deliveries)}, errors {cluster.errors[:5]}")
        raise AssertionError(f"not done within {OVERALL_S:g} s, while {phase[0]}{seen}; seed {seed}") from None
    assert cluster is not None

    # Every run complete once, with the output computed from its input, and every node complete once;
    # every api node's callback accepted exactly once, whichever process took it.
    api_node_ids: set[str] = set()
    for k, (run, history) in enumerate(zip(out.runs, out.histories, strict=True)):
        assert run["state"] == "complete" and run["output"] == expected_output(k), run
        nodes = all_nodes(run)
        assert len(nodes) == 6 and all(n["state"] == "complete" for n in nodes), run
        api_node_ids |= {n["id"] for n in nodes if n["step"]["kind"] == "api"}
        accepted = Counter(e["node_id"] for e in history
                           if e["kind"] == "callback" and e["data"].get("outcome") == "accepted")
        completed = Counter(e["node_id"] for e in history
                            if e["kind"] == "state" and e["data"].get("to") == "complete")
        refused = [e for e in history if e["kind"] == "callback" and e["data"].get("outcome") == "refused"]
        assert not refused, (run["id"], refused)
        for node in nodes:
            expected = 1 if node["step"]["kind"] == "api" else 0
            assert accepted[node["id"]] == expected, (node["step"]["name"], node["id"], history)
            assert completed[node["id"]] == 1, (node["step"]["name"], node["id"], history)
    assert len(api_node_ids) == 4 * RUNS

    # The step services saw each step of each run, and nothing else; no 5xx nor other refusal anywhere
    # (the test's own requests assert their statuses as they go).
    assert {c.node_id for c in out.calls} == api_node_ids
    assert svc.errors == [] and cluster.errors == [], (svc.errors, cluster.errors)
    for server in out.servers:
        assert "Exception in ASGI application" not in server.log(), f"{server} answered 500; see its log"

    # Callbacks landed on any process: each took callbacks minted by another, and each one's callbacks
    # were taken by another.
    crossed = [d for d in cluster.deliveries if d.minted_by != d.posted_to and d.body == {"accepted": True}]
    for port in ports:
        assert any(d.posted_to == port for d in crossed), f":{port} never accepted another process's callback"
        assert any(d.minted_by == port for d in crossed), f"no other process accepted a callback minted by :{port}"

    # The victim's work got done: every call it died holding alone was made again by a survivor after the
    # kill, once its lease had expired (the steps' deadlines are far off), and completed once (above).
    survivors = [p for p in ports if p != cluster.victim]

    def story(held: Call) -> list[tuple[int, int | None, float]]:
        """(minting port, attempt, seconds after the kill) of every call of the held call's node."""
        return [(port_of(c), c.attempt, round(c.received_at - out.killed_at, 2))
                for c in out.calls if c.node_id == held.node_id]

    after_kill = []
    for held in out.held_alone:
        again = [c.received_at - out.killed_at for c in out.calls if c.node_id == held.node_id
                 and port_of(c) in survivors and c.received_at > out.killed_at]
        assert again, f"node {held.node_id}: its call died with :{cluster.victim} and was never made again: " \
                      f"{story(held)}"
        after_kill.append(min(again))
    redirected = [d for d in cluster.deliveries if d.minted_by == cluster.victim and d.after_kill]

    repeated = sum(n - 1 for n in Counter((c.node_id, c.attempt) for c in out.calls).values())
    duplicates = sum(1 for d in cluster.deliveries if d.body == {"accepted": False, "duplicate": True})
    tracebacks = {s.port: s.log().count("Traceback") for s in out.servers}
    print(f"\nscale-out: {RUNS} runs on {PROCESSES} processes in {time.monotonic() - began:.1f} s (seed {seed}); "
          f"killed :{cluster.victim} at {out.killed_at - began:.1f} s with {out.done_at_kill} runs done and "
          f"{len(out.held_alone)} calls held, made again by survivors "
          f"{min(after_kill):.2f}-{max(after_kill):.2f} s after the kill; calls {len(out.calls)} "
          f"({repeated} repeated); callbacks {len(cluster.deliveries)} ({len(crossed)} accepted off their minter, "
          f"{duplicates} duplicate, {len(redirected)} of the victim's redirected, "
          f"{len(cluster.transport_errors)} transport errors retried); {len(out.retried_starts)} starts retried; "
          f"tracebacks in logs {tracebacks}; phases "
          + ", ".join(f"{name} {at - began:.1f}" for name, at in out.marks.items()))


async def _scenario(launcher: Launcher, database_url: str, http: aiohttp.ClientSession, svc: StepService,
                    cluster: Cluster, phase: list[str]) -> Outcome:
    for name, fn in STEPS.items():
        svc.route(f"/{name}", cluster.behaviour(name, fn))
    servers = await start_cluster(launcher, database_url, cluster.ports, secrets.token_urlsafe(32))
    apis = [Api(http, server.url) for server in servers]
    victim = servers[VICTIM]

    phase[0] = "defining the steps and starting the runs"
    for name in STEPS:
        await apis[0].put_step({"name": name, "kind": "api", "url": svc.url(f"/{name}"),
                                "timeout_s": STEP_TIMEOUT_S, "retry": RETRY})
    await apis[0].put_step(TREE)
    gate = asyncio.Semaphore(START_CONCURRENCY)
    retried_starts: list[str] = []

    async def start(k: int) -> str:
        """Start run k on process k mod 3, as a balancer would: on another live one if that one is dead or
        the request was cut, under one Idempotency-Key so that a retried start never makes a second run."""
        body = {"step": "scale", "input": run_input(k)}
        key = {"Idempotency-Key": f"scale-run-{k}"}
        tried: set[int] = set()
        async with gate:
            for _ in range(CALLBACK_TRIES):
                live = [i for i in range(PROCESSES) if cluster.ports[i] not in cluster.dead and i not in tried]
                i = k % PROCESSES if k % PROCESSES in live else cluster.rng.choice(live)
                try:
                    status, run = await apis[i].call("POST", "/api/v1/runs", body, headers=key)
                except (aiohttp.ClientError, TimeoutError) as exc:
                    retried_starts.append(f"run {k} on :{cluster.ports[i]}: {type(exc).__name__}: {exc}")
                    tried.add(i)
                    continue
                # 200: the same key's run, which the cut request had started after all.
                assert status == 201 or (status == 200 and tried), f"POST /runs (run {k}): HTTP {status} {run}"
                return str(run["id"])
        raise AssertionError(f"run {k} could not be started: {retried_starts[-CALLBACK_TRIES:]}")

    async def until(event: asyncio.Event, starting: asyncio.Future[list[str]]) -> None:
        """Wait for `event`; fail at once if starting the runs failed meanwhile."""
        waiter = asyncio.ensure_future(event.wait())
        either: set[asyncio.Future[Any]] = {waiter, starting}
        try:
            await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
            if starting.done():
                starting.result()
            await waiter
        finally:
            waiter.cancel()

    marks = {"up": time.monotonic()}
    # The runs are started while the earlier ones run, and the kill may come before the last is started.
    starting = asyncio.ensure_future(asyncio.gather(*(start(k) for k in range(RUNS))))
    try:
        phase[0] = f"waiting for {KILL_AFTER_DONE} runs to complete"
        await until(cluster.third_done, starting)
        marks["third done"] = time.monotonic()
        cluster.holding = True
        phase[0] = f"holding {HELD_TARGET} calls of the victim :{victim.port}"
        while len(held_alone := cluster.held_alone()) < HELD_TARGET:  # a survivor may take one over meanwhile
            cluster.enough_held.clear()
            await until(cluster.enough_held, starting)
        marks["held"] = time.monotonic()
        done_at_kill = cluster.runs_done
        assert done_at_kill < RUNS, "every run was done before the kill: nothing was mid-way"
        victim.kill()  # nothing ran since held_alone was read: the victim dies holding those calls' leases
        killed_at = time.monotonic()
        cluster.dead.add(victim.port)
        cluster.victim_dead.set()
        phase[0] = "starting the last runs"
        run_ids = list(await starting)
        marks["all started"] = time.monotonic()
    finally:
        starting.cancel()
        await asyncio.gather(starting, return_exceptions=True)

    phase[0] = "waiting for the survivors to finish every run"
    survivors = [api for i, api in enumerate(apis) if i != VICTIM]
    wanted = set(run_ids)
    for turn in itertools.count():
        status, body = await survivors[turn % len(survivors)].call("GET", f"/api/v1/runs?limit={RUNS + 50}")
        assert status == 200, f"GET /runs: HTTP {status} {body}"
        states = {r["id"]: r["state"] for r in body["runs"]}
        assert set(states) == wanted, f"runs other than the {RUNS} started: {set(states) - wanted}"
        failed = [run_id for run_id, state in states.items() if state in ("error", "cancelled")]
        assert not failed, f"runs that did not complete: {await _explain(survivors[0], failed)}"
        counts = Counter(states.values())
        phase[0] = f"waiting for the survivors to finish every run ({dict(counts)})"
        if counts["complete"] == RUNS:
            break
        await asyncio.sleep(POLL_RUNS_S)

    phase[0] = "reading the runs and their histories"
    reads = asyncio.Semaphore(READ_CONCURRENCY)

    async def read(i: int, run_id: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        async with reads:
            api = survivors[i % len(survivors)]
            return await api.run(run_id), await api.events(run_id)

    read_back = await asyncio.gather(*(read(i, run_id) for i, run_id in enumerate(run_ids)))
    return Outcome(servers, [r for r, _ in read_back], [h for _, h in read_back], svc.calls(), killed_at,
                   done_at_kill, held_alone, marks, retried_starts)


async def _explain(api: Api, run_ids: list[str]) -> list[dict[str, Any]]:
    """The errors of the runs that failed, with the history of the nodes where they started."""
    explained = []
    for run_id in run_ids[:3]:
        run = await api.run(run_id)
        error = run.get("error") or {}
        history = [e for e in await api.events(run_id) if e["node_id"] == error.get("node_id")]
        explained.append({"run": run_id, "state": run["state"], "error": error, "node_history": history})
    return explained


async def test_a_generated_signing_key_is_shared_by_every_process(
        launcher: Launcher, database_url: str, http: aiohttp.ClientSession) -> None:
    """Without AETR_SECRET, the processes started together agree on the key kept in the database."""
    ports = distinct_ports(PROCESSES)
    servers = await start_cluster(launcher, database_url, ports, secret=None)
    apis = [Api(http, server.url) for server in servers]
    async with StepService() as svc:
        svc.route("/echo", never())  # the test posts the callbacks itself
        await apis[0].put_step({"name": "echo", "kind": "api", "url": svc.url("/echo"), "timeout_s": STEP_TIMEOUT_S})
        # A process calls the steps of the runs it starts, most of the time: start runs round-robin until
        # every process has minted a callback URL.
        run_inputs: dict[str, Any] = {}
        minted: dict[int, Call] = {}
        for k in range(10 * PROCESSES):
            run_id = await apis[k % PROCESSES].start_run("echo", {"k": k})
            run_inputs[run_id] = {"k": k}
            calls = await svc.wait_for_calls("/echo", k + 1, timeout=WAIT_S)
            for call in calls:  # one node per minter (a node called twice has one token, whoever minted it)
                if all(c.node_id != call.node_id for c in minted.values()):
                    minted.setdefault(port_of(call), call)
            if len(minted) == PROCESSES:
                break
        assert set(minted) == set(ports), f"calls were minted by {sorted(minted)} only, of {ports}"

        for minter, call in minted.items():
            path = urlsplit(callback_url(call)).path
            others = [p for p in ports if p != minter]
            answers = []
            for port in [*others, minter]:
                async with http.post(f"http://127.0.0.1:{port}{path}", json={"echo": call.json}) as resp:
                    answers.append((port, resp.status, await resp.json()))
            # Taken by the first other process; the same callback is then a duplicate everywhere: every
            # process verified the token (a token it could not verify would get 404).
            assert answers == [(others[0], 200, {"accepted": True}),
                               (others[1], 200, {"accepted": False, "duplicate": True}),
                               (minter, 200, {"accepted": False, "duplicate": True})], (minter, answers)
            forged = path[:-2] + ("AA" if not path.endswith("AA") else "BB")
            for port in ports:
                async with http.post(f"http://127.0.0.1:{port}{forged}", json={}) as resp:
                    assert resp.status == 404, (port, forged, resp.status, await resp.text())

        for call in minted.values():
            assert call.run_id is not None
            run_id = call.run_id
            run = await apis[0].wait_run(run_id, WAIT_S)
            assert run["state"] == "complete" and run["output"] == {"echo": run_inputs[run_id]}, run


SIBLING_RUNS = 60  # runs whose two parallel steps fail at the same moment; the deadlock comes within a few


async def test_parallel_siblings_failing_at_once_on_two_processes_are_answered_without_500(
        launcher: Launcher, database_url: str, http: aiohttp.ClientSession) -> None:
    ports = distinct_ports(2)
    await start_cluster(launcher, database_url, ports, secrets.token_urlsafe(32))
    api = Api(http, f"http://127.0.0.1:{ports[0]}")
    async with StepService() as svc:
        svc.route("/sibling", never())  # the test posts the failures itself, both at once
        for name in ("sibling-b", "sibling-c"):
            await api.put_step({"name": name, "kind": "api", "url": svc.url("/sibling"),
                                "timeout_s": STEP_TIMEOUT_S, "retry": {"max_attempts": 1}})
        await api.put_step({"name": "siblings", "kind": "parallel",
                            "children": [{"step": "sibling-b"}, {"step": "sibling-c"}]})

        async def fail(call: Call, port: int) -> tuple[int, str]:
            path = urlsplit(callback_url(call)).path
            async with http.post(f"http://127.0.0.1:{port}{path}/fail",
                                 json={"error": "boom", "retryable": False}) as resp:
                return resp.status, (await resp.text())[:200]

        for k in range(SIBLING_RUNS):
            run_id = await api.start_run("siblings", {"k": k})
            calls = [c for c in await svc.wait_for_calls("/sibling", 2 * (k + 1), timeout=WAIT_S)
                     if c.run_id == run_id]
            assert len(calls) == 2, calls
            # One failure wins (its node is error, the other cancelled); the other is refused as cancelled.
            answers = await asyncio.gather(fail(calls[0], ports[0]), fail(calls[1], ports[1]))
            assert sorted(status for status, _ in answers) == [200, 409], f"run {k}: {answers}"
            run = await api.wait_run(run_id, WAIT_S)
            assert run["state"] == "error", run
