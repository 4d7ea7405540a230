"""Hostile mappers, stored and run over HTTP next to ordinary runs, fail only their own node."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from aetr.testing import StepService, callback
from tests.integration.conftest import Server, running_server

TIME_LIMIT_S = 0.5  # AETR_SANDBOX_TIME_LIMIT_S for this server: short, so the endless scripts end soon
NORMAL_RUNS = 10
STEP_DELAY_S = 0.05  # seconds each ordinary step takes to call back, so the ordinary runs overlap the abuse
PROBE_EVERY_S = 0.1  # seconds between two health probes while the runs go on
PROBE_TIMEOUT_S = 5.0  # seconds a health probe may take before it counts as a failure
RUN_TIMEOUT_S = 60.0  # seconds for every run to end (SQLite queues writes behind each endless script)

TIME_LIMIT = f"script exceeded the time limit of {TIME_LIMIT_S} s (raise it with AETR_SANDBOX_TIME_LIMIT_S)"
MEMORY_LIMIT = "script exceeded the memory limit of 64 MiB (raise it with AETR_SANDBOX_MEMORY_MB)"

# name -> (mapper, the messages its node's error may carry: the first one that applies is V8's choice)
ABUSE: dict[str, tuple[str, tuple[str, ...]]] = {
    "endless-loop": ("(x) => { while (true) {} }", (TIME_LIMIT,)),
    "gigabyte-array": ("(x) => new Array(2 ** 28).fill(1)", (TIME_LIMIT, MEMORY_LIMIT)),
    # Near its heap limit V8 collects again and again before it gives up: on a busy machine the time limit can
    # come first (seen once in CI). Either way the script is stopped and only its node fails.
    "heap-fill": ("(x) => { const a = []; while (true) a.push(new Array(1e6).fill(1)); }", (MEMORY_LIMIT, TIME_LIMIT)),
    "string-doubling": ("(x) => { let s = 'x'; while (true) s += s; }", ("RangeError: Invalid string length",)),
    "deep-recursion": ("(x) => { function f() { return f() + 1 }; return f() }",
                       ("RangeError: Maximum call stack size exceeded",)),
    "require-fs": ("(x) => require('fs').readFileSync('/etc/passwd', 'utf8')",
                   ("ReferenceError: require is not defined",)),
    "process-exit": ("(x) => process.exit(1)", ("ReferenceError: process is not defined",)),
    "fetch": ("(x) => fetch('http://127.0.0.1')", ("ReferenceError: fetch is not defined",)),
    "function-constructor": ("(x) => globalThis.constructor.constructor('return process')().exit(1)",
                             ("EvalError: Function() is not available in the sandbox: code generation from strings "
                              "is disabled",)),
    "dynamic-import": ("(x) => import('fs')", ("no import(): modules cannot load here",)),
}
AT_START = "endless-loop-at-start"  # the same endless loop on the first link: it runs inside POST /runs


@dataclass
class Health:
    """`GET /healthz` probed over and over while the runs go on: what it answered and how long it took."""

    answers: list[tuple[int, float]] = field(default_factory=list)

    @asynccontextmanager
    async def probing(self, aetr: Server) -> AsyncIterator[None]:
        stop = asyncio.Event()

        async def probe() -> None:
            timeout = aiohttp.ClientTimeout(total=PROBE_TIMEOUT_S)
            while not stop.is_set():
                started = time.monotonic()
                try:
                    async with aetr.http.get(aetr.base_url + "/healthz", timeout=timeout) as response:
                        status = response.status
                except (aiohttp.ClientError, TimeoutError):
                    status = 0
                self.answers.append((status, time.monotonic() - started))
                with suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), PROBE_EVERY_S)

        task = asyncio.create_task(probe())
        try:
            yield
        finally:
            stop.set()
            await task


def ordinary_output(n: int) -> dict[str, Any]:
    """What ordinary run n must end with: each step once, in order, the mapper's +10 between the first two."""
    return {"n": n, "v": (n + 1 + 10) * 2, "seen": ["inc", "double"], "index": 1}


async def test_hostile_mappers_fail_their_own_node_while_ordinary_runs_complete_and_the_server_stays_healthy(
        database_url: str, steps_service: StepService) -> None:
    svc = steps_service
    svc.route("/inc", callback(lambda x: {**x, "v": x["v"] + 1, "seen": [*x.get("seen", []), "inc"]},
                               delay=STEP_DELAY_S))
    svc.route("/double", callback(lambda x: {**x, "v": x["v"] * 2, "seen": [*x["seen"], "double"]},
                                  delay=STEP_DELAY_S))
    svc.route("/prep", callback(lambda x: {"prepared": x}, delay=STEP_DELAY_S))
    svc.route("/target", callback(lambda x: {"should never": "be called"}))
    health = Health()
    async with running_server(database_url, sandbox_time_limit_s=TIME_LIMIT_S) as aetr:
        await aetr.put_step({"name": "ordinary", "kind": "sequential", "children": [
            {"step": {"name": "inc", "kind": "api", "url": svc.url("/inc")}},
            {"step": {"name": "double", "kind": "api", "url": svc.url("/double")},
             "mapper": "(x, ctx) => ({...x, v: x.v + 10, index: ctx.index})"}]})
        await aetr.put_step({"name": "prep", "kind": "api", "url": svc.url("/prep")})
        await aetr.put_step({"name": "target", "kind": "api", "url": svc.url("/target")})
        for name, (mapper, _) in ABUSE.items():
            await aetr.put_step({"name": name, "kind": "sequential", "children": [
                {"step": "prep"}, {"step": "target", "mapper": mapper}]})
        await aetr.put_step({"name": AT_START, "kind": "sequential", "children": [
            {"step": "target", "mapper": ABUSE["endless-loop"][0]}]})

        async with health.probing(aetr):
            names = [*ABUSE, AT_START]
            # Abusive and ordinary runs interleaved, all started at once.
            started = await asyncio.gather(*[aetr.start(name, name) for name in names],
                                           *[aetr.start("ordinary", {"n": n, "v": n}) for n in range(NORMAL_RUNS)])
            runs = await asyncio.gather(*(aetr.wait_run(run_id, RUN_TIMEOUT_S) for run_id in started))
            # Afterwards the sandbox still runs mappers: one more ordinary run.
            after = await aetr.wait_run(await aetr.start("ordinary", {"n": 99, "v": 99}), RUN_TIMEOUT_S)

    abusive = dict(zip(names, runs[:len(names)], strict=True))
    ordinary = runs[len(names):]
    for name, run in abusive.items():
        accepted = ABUSE["endless-loop" if name == AT_START else name][1]
        target = run["children"][-1]
        assert run["state"] == "error" and run["error"]["kind"] == "mapper", (name, run)
        assert run["error"]["node_id"] == target["id"] and run["error"]["step"] == "target", (name, run["error"])
        assert any(message in run["error"]["message"] for message in accepted), (name, run["error"])
        assert target["state"] == "error" and target["error"] == run["error"], (name, target)
        if name != AT_START:
            assert run["children"][0]["state"] == "complete", (name, run)
    assert svc.calls("/target") == [], "a step behind a failed mapper was called"
    assert {c.run_id for c in svc.calls("/prep")} == {run["id"] for name, run in abusive.items() if name != AT_START}
    for n, run in enumerate(ordinary):
        assert run["state"] == "complete" and run["output"] == ordinary_output(n), run
    assert after["state"] == "complete" and after["output"] == ordinary_output(99), after
    # Every callback was answered 200, every probe of /healthz too (no 5xx, no time-out), and probes ran all along.
    for path in ("/inc", "/double", "/prep"):
        assert {answer.status for answer in svc.callback_answers(path)} == {200}, (path, svc.callback_answers(path))
    assert svc.errors == [], svc.errors
    assert len(health.answers) >= 3, health.answers  # the endless scripts alone keep the runs going ≥ 0.5 s
    assert {status for status, _ in health.answers} == {200}, health.answers


async def evaluate(aetr: Server, source: str, run_input: Any = None) -> dict[str, Any]:
    """`POST /sandbox/evaluate`'s answer, which is 200 whether the script succeeded or not."""
    status, answer = await aetr.call("POST", "/api/v1/sandbox/evaluate", {"source": source, "input": run_input})
    assert status == 200, answer
    result: dict[str, Any] = answer
    return result


async def test_an_evaluate_call_sees_nothing_that_an_earlier_caller_left(aetr: Server) -> None:
    # One caller after another, so the server's sandbox hands each the worker the previous one used.
    secret = "first caller secret 1729"
    register = """(input) => {
      try { __aetr.compile('persist', '() => (' + JSON.stringify(input) + ')', ''); } catch (e) {}
      return 1;
    }"""
    assert await evaluate(aetr, register, secret) == {"ok": True, "output": 1}
    steal = "() => { try { return __aetr.run('persist', '[null]'); } catch (e) { return String(e); } }"
    assert secret not in str(await evaluate(aetr, steal))

    victim = r"(input) => /^([^@]+)@/.exec(input)[1].length"
    assert (await evaluate(aetr, victim, "alice.secret@example.com"))["output"] == len("alice.secret")
    read_last_match = "() => [RegExp.$1, RegExp.input, RegExp.lastMatch].map(String)"
    assert "secret" not in str(await evaluate(aetr, read_last_match))

    set_global = await evaluate(aetr, "(x) => { globalThis.leak = x; return 1 }", secret)
    assert set_global["ok"] is False and set_global["error"]["kind"] == "threw", set_global
    assert (await evaluate(aetr, "() => typeof globalThis.leak"))["output"] == "undefined"
    for pollute in ["(x) => { Object.prototype.x = x; return 1 }",
                    "() => { Array.prototype.map = () => []; return 1 }"]:
        assert (await evaluate(aetr, pollute, secret))["error"]["kind"] == "threw"
    assert (await evaluate(aetr, "(a) => [typeof ({}).x, a.map((n) => n + 1)]", [1]))["output"] == ["undefined", [2]]

    fill = """(k) => {
      for (let i = 0; i < 200; i++) {
        try { __aetr.compile('fill-' + k + '-' + i, "() => '" + 'x'.repeat(20000) + "'", ''); }
        catch (e) { return String(e); }
      }
      return 'filled';
    }"""
    for k in range(16):
        assert (await evaluate(aetr, fill, k))["output"] == "ReferenceError: __aetr is not defined"
    assert await evaluate(aetr, "(i) => ({ ok: i })", 7) == {"ok": True, "output": {"ok": 7}}


class WatchedScripts:
    """The server's sandbox, telling the test when a script has started."""

    def __init__(self, scripts: Any) -> None:
        self.scripts = scripts
        self.started = asyncio.Event()

    async def acall(self, source: str, args: list[Any]) -> Any:
        self.started.set()
        return await self.scripts.acall(source, args)


LOOPING_RUNS = 4
LOOP_LIMIT_S = 1.0  # AETR_SANDBOX_TIME_LIMIT_S here: LOOPING_RUNS seconds of looping, if they ran one by one
QUICK_START_S = 0.5  # an unrelated POST /runs answers in tens of milliseconds; well under one loop's limit


async def test_a_looping_mapper_holds_up_no_other_run_s_writes(database_url: str, steps_service: StepService) -> None:
    svc = steps_service
    svc.route("/ok", callback(lambda x: {"done": x}))
    svc.route("/target", callback(lambda x: {"should never": "be called"}))
    async with running_server(database_url, sandbox_time_limit_s=LOOP_LIMIT_S) as aetr:
        await aetr.put_step({"name": "unrelated", "kind": "api", "url": svc.url("/ok")})
        await aetr.put_step({"name": "target", "kind": "api", "url": svc.url("/target")})
        await aetr.put_step({"name": "looping", "kind": "sequential", "children": [
            {"step": "target", "mapper": "(x) => { while (true) {} }"}]})
        watched = WatchedScripts(aetr.engine.coordinator.scripts)
        aetr.engine.coordinator.scripts = watched
        looping = [asyncio.create_task(aetr.start("looping", n)) for n in range(LOOPING_RUNS)]
        await asyncio.wait_for(watched.started.wait(), 10.0)

        sent = time.monotonic()
        unrelated = await aetr.start("unrelated", "meanwhile")
        answered_s = time.monotonic() - sent
        looping_ids = await asyncio.gather(*looping)
        looped = await asyncio.gather(*(aetr.wait_run(run_id, RUN_TIMEOUT_S) for run_id in looping_ids))
        assert (await aetr.wait_run(unrelated))["output"] == {"done": "meanwhile"}

    print(f"unrelated POST /runs answered in {answered_s:.3f} s")
    assert answered_s < QUICK_START_S, f"POST /runs took {answered_s:.2f} s while mappers looped"
    message = f"script exceeded the time limit of {LOOP_LIMIT_S} s (raise it with AETR_SANDBOX_TIME_LIMIT_S)"
    for run in looped:
        assert run["state"] == "error", run
        assert (run["error"]["kind"], run["error"]["message"], run["error"]["step"]) == ("mapper", message, "target")
    assert svc.calls("/target") == []
