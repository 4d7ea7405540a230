"""What every scenario shares: sizes, the running processes, timing and CPU meters, and API helpers."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import os
import shutil
import signal
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import aiohttp
import asyncpg
import orjson

from benchmarks.processes import AetrServer, Profiler, StepServiceProcess, load_average, log, postgres_cpu_seconds
from benchmarks.procstat import children_of, cpu_seconds, machine_busy_seconds

PROFILER_ATTACH_S: Final = 0.5  # seconds py-spy is given to attach before the measured phase starts
SESSION_SAMPLE_S: Final = 0.25  # seconds between two looks at PostgreSQL's sessions during a measured phase
SESSIONS_SQL: Final = (
    "SELECT count(*) FILTER (WHERE wait_event_type = 'Lock'), count(*) FILTER (WHERE state = 'active'), count(*)"
    " FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()")
API: Final = "/api/v1"


@dataclass(frozen=True)
class Sizes:
    """How big each scenario is: the reference sizes, or a smoke-test fraction of them (--quick)."""

    chain_steps: int = 100
    chain_runs: int = 20
    throughput_runs: int = 500
    throughput_steps: int = 3
    fanout: tuple[int, ...] = (1_000, 10_000)
    load_run_nodes: int = 10_000
    load_tree_nodes: int = 1_000
    load_samples: int = 10
    warmup_runs: int = 10
    sandbox_calls: int = 5_000
    sandbox_http_calls: int = 500
    mapper_chain_steps: int = 20
    mapper_chain_runs: int = 5
    map_items: int = 10_000  # the map scenario's map and parallel; map-large's small run
    map_large_items: int = 100_000
    map_large_samples: int = 5  # GETs of each run in map-large
    concurrency_runs: int = 5_000  # runs of each api step (limited, free) in the concurrency scenario
    concurrency_limit: int = 50

    @staticmethod
    def quick() -> Sizes:
        """Small enough for both databases to finish in under a minute."""
        return Sizes(chain_steps=10, chain_runs=2, throughput_runs=20, fanout=(20, 100), load_run_nodes=100,
                     load_tree_nodes=50, load_samples=3, warmup_runs=2, sandbox_calls=200, sandbox_http_calls=30,
                     mapper_chain_steps=5, mapper_chain_runs=1, map_items=100, map_large_items=500,
                     map_large_samples=2, concurrency_runs=40, concurrency_limit=5)


GC_METRIC = 'python_gc_collections_total{generation="'  # prometheus_client's own collector, in /metrics


@dataclass
class Phase:
    """What a measured phase used: wall time, CPU seconds per process, and (PostgreSQL) what sessions did."""

    wall_s: float = 0.0
    cpu_s: dict[str, float] = field(default_factory=dict)
    pg_sessions: dict[str, float] = field(default_factory=dict)
    # Millions of instructions the AETR processes retired (perf stat), when perf can count them here.
    instructions_m: float | None = None
    # Collections of each generation by Python's cycle collector in the server (one process only).
    gc_collections: list[int] | None = None


class InstructionCount:
    """`perf stat -e instructions` attached to some processes for a phase.

    CPU seconds move with this VM's speed (the same code measured 1.7x apart between sessions, and 2x within
    one); the instructions a process retires do not, so they compare code with code across runs.
    """

    def __init__(self, pids: Sequence[int]) -> None:
        self.pids = list(pids)
        fd, out = tempfile.mkstemp(prefix="aetr-bench-perf-", suffix=".csv")
        os.close(fd)
        self.out = Path(out)
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        perf = shutil.which("perf")
        if perf is None or not self.pids:
            self.out.unlink(missing_ok=True)
            return
        self.proc = await asyncio.create_subprocess_exec(
            perf, "stat", "-e", "instructions", "-x", ",", "-o", str(self.out), "-p", ",".join(map(str, self.pids)),
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)

    async def stop(self) -> float | None:
        """Millions of instructions since start; None when perf is missing or could not count."""
        if self.proc is None:
            return None
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGINT)
        try:
            await asyncio.wait_for(self.proc.wait(), 10)
        except TimeoutError:
            self.proc.kill()
            return None
        return self._collect()

    def _collect(self) -> float | None:
        try:
            lines = self.out.read_text().splitlines()
        except OSError:
            return None
        finally:
            self.out.unlink(missing_ok=True)
        for line in lines:
            value, _, rest = line.partition(",")
            if "instructions" in rest and value.strip().isdigit():
                return round(int(value) / 1e6, 1)
        return None


async def sample_sessions(database_url: str, stop: asyncio.Event, into: Phase) -> None:
    """Until `stop`, count the database's sessions that wait on a lock, that are active, and that exist."""
    conn = await asyncpg.connect(database_url, timeout=10)
    samples: list[tuple[int, int, int]] = []
    try:
        while not stop.is_set():
            row = await conn.fetchrow(SESSIONS_SQL)
            if row is not None:
                samples.append((int(row[0]), int(row[1]), int(row[2])))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), SESSION_SAMPLE_S)
    finally:
        await conn.close()
    if samples:
        into.pg_sessions = {
            "lock_waiting_mean": round(sum(s[0] for s in samples) / len(samples), 1),
            "lock_waiting_max": max(s[0] for s in samples),
            "active_mean": round(sum(s[1] for s in samples) / len(samples), 1),
            "connections_max": max(s[2] for s in samples),
            "samples": len(samples),
        }


@dataclass
class Context:
    """One scenario on one fresh database: its server, its step service, an HTTP session, and options."""

    db: str
    database_url: str
    server: AetrServer
    svc: StepServiceProcess
    http: aiohttp.ClientSession
    sizes: Sizes
    quick: bool
    timeout_factor: float
    label: str
    profile_dir: Path | None = None
    profile_format: str = "raw"
    profile_flags: tuple[str, ...] = ()
    profiled: bool = False
    phases: dict[str, Phase] = field(default_factory=dict)
    refused_starts: int = 0  # starts answered 503 (the server's start queue full) and sent again

    def _sandbox_worker_cpu(self) -> dict[int, float]:
        """CPU seconds used so far by each of the server's sandbox worker processes."""
        self.server.sample_children()
        return {pid: used for pid in self.server.sandbox_pids() if (used := cpu_seconds(pid)) is not None}

    def _aetr_cpu(self) -> dict[int, float]:
        """CPU seconds used so far by each process serving AETR (one, or its worker processes too)."""
        return {pid: used for pid in self.server.aetr_pids() if (used := cpu_seconds(pid)) is not None}

    def _call_process_cpu(self) -> dict[int, float]:
        """CPU seconds used so far by each of the server's call processes."""
        return {pid: used for pid in self.server.call_pids() if (used := cpu_seconds(pid)) is not None}

    def _own_helper_cpu(self) -> dict[int, float]:
        """CPU seconds used so far by this process's children other than the server and the step service."""
        mine = {self.server.pid, self.svc.pid}
        return {pid: used for pid in children_of(os.getpid())
                if pid not in mine and (used := cpu_seconds(pid)) is not None}

    async def _gc_collections(self) -> list[int] | None:
        """The server's cycle collections so far, per generation, from its /metrics; None when it serves from
        several processes (each answer would be one worker's) or the numbers cannot be read."""
        if len(self.server.aetr_pids()) != 1:
            return None
        counts: dict[int, int] = {}
        try:
            async with self.http.get(self.server.url + "/metrics") as response:
                text = await response.text()
        except (aiohttp.ClientError, TimeoutError):
            return None
        for line in text.splitlines():
            if line.startswith(GC_METRIC):
                generation, _, value = line[len(GC_METRIC):].partition('"} ')
                counts[int(generation)] = int(float(value))
        return [counts[g] for g in range(3)] if sorted(counts) == [0, 1, 2] else None

    @property
    def other_load_pct(self) -> float:
        """The largest share of the machine that other work took during any measured phase, in percent."""
        return max((p.cpu_s.get("other_pct", 0.0) for p in self.phases.values()), default=0.0)

    def timeout(self, seconds: float) -> float:
        """A deadline scaled by --timeout-factor."""
        return seconds * self.timeout_factor

    @property
    def api(self) -> str:
        """The base URL of the AETR API."""
        return self.server.url + API

    @asynccontextmanager
    async def measure(self, name: str) -> AsyncIterator[Phase]:
        """Time a phase and the CPU it costs; profile the server meanwhile when --profile asked for it."""
        profiler: Profiler | None = None
        if self.profile_dir is not None:
            self.profile_dir.mkdir(parents=True, exist_ok=True)
            suffix = {"raw": "txt", "flamegraph": "svg", "speedscope": "json"}.get(self.profile_format, "out")
            out = self.profile_dir / f"{self.label}-{self.db}-{name}.{suffix}"
            profiler = Profiler(self.server.pid, out, self.profile_format, list(self.profile_flags),
                                self.profile_dir / "py-spy.log")
            profiler.start()
            await asyncio.sleep(PROFILER_ATTACH_S)
            self.profiled = True
        pids = {"stepsvc": self.svc.pid}
        gc_before = await self._gc_collections()  # before the counts start: serving /metrics is not the phase's
        counter = InstructionCount(self.server.aetr_pids())
        await counter.start()
        aetr_before = self._aetr_cpu()
        before = {k: cpu_seconds(p) or 0.0 for k, p in pids.items()}
        own = os.times()
        pg_before = postgres_cpu_seconds()
        workers_before = self._sandbox_worker_cpu()
        calls_before = self._call_process_cpu()
        helpers_before = self._own_helper_cpu()
        busy_before = machine_busy_seconds()
        phase = Phase()
        stop = asyncio.Event()
        sampler = (asyncio.create_task(sample_sessions(self.database_url, stop, phase))
                   if self.db == "postgres" else None)
        start = time.perf_counter()
        try:
            yield phase
        finally:
            phase.wall_s = time.perf_counter() - start
            stop.set()
            if sampler is not None:
                try:
                    await sampler
                except (OSError, asyncpg.PostgresError) as exc:  # the numbers are extra: never fail a case on them
                    log(f"sampling PostgreSQL sessions failed: {exc}")
            after = {k: cpu_seconds(p) or 0.0 for k, p in pids.items()}
            phase.cpu_s = {"aetr": round(sum(v - aetr_before.get(pid, 0.0) for pid, v in self._aetr_cpu().items()), 2),
                           **{k: round(after[k] - before[k], 2) for k in pids}}
            now = os.times()
            helpers = sum(v - helpers_before.get(pid, 0.0) for pid, v in self._own_helper_cpu().items())
            phase.cpu_s["driver"] = round(now.user + now.system - own.user - own.system + helpers, 2)
            pg_after = postgres_cpu_seconds()
            phase.cpu_s["postgres"] = round(sum(v - pg_before.get(pid, 0.0) for pid, v in pg_after.items()), 2)
            workers_after = self._sandbox_worker_cpu()
            phase.cpu_s["aetr_sandbox"] = round(
                sum(v - workers_before.get(pid, 0.0) for pid, v in workers_after.items()), 2)
            phase.cpu_s["aetr_calls"] = round(
                sum(v - calls_before.get(pid, 0.0) for pid, v in self._call_process_cpu().items()), 2)
            busy = machine_busy_seconds() - busy_before
            # Everything else on the machine (other users' work competes for the same two cores).
            other = max(0.0, busy - sum(phase.cpu_s.values()))
            capacity = phase.wall_s * (os.cpu_count() or 1)
            phase.cpu_s["other"] = round(other, 2)
            phase.cpu_s["other_pct"] = round(100 * other / capacity, 1) if capacity else 0.0
            phase.cpu_s["machine_busy_pct"] = round(100 * busy / capacity, 1) if capacity else 0.0
            phase.cpu_s["loadavg_1m"] = load_average()
            phase.instructions_m = await counter.stop()
            gc_after = await self._gc_collections()
            if gc_before is not None and gc_after is not None:
                phase.gc_collections = [after - before for before, after in zip(gc_before, gc_after, strict=True)]
            self.server.sample_children()
            self.phases[name] = phase
            if profiler is not None:
                await profiler.finish()


# ---- statistics ---------------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """The nearest-rank q-quantile (q in [0, 1]) of `values`; NaN when empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q * len(ordered)))
    return ordered[rank - 1]


def ms(ns: float) -> float:
    """Nanoseconds as milliseconds, rounded for reading."""
    return round(ns / 1e6, 3)


def chain_gaps(stats: dict[str, Any], run_ids: Sequence[str]) -> tuple[list[int], list[int]]:
    """For sequential runs: (gaps, callback answer times), both in ns.

    A gap is from the moment the step service sent step k's callback to the moment step k+1's request
    reached it. The answer time is from sending a callback to reading AETR's answer.
    """
    sent: dict[tuple[str, int], int] = {}
    answer_ns = []
    for node_id, attempt, sent_ns, answered_ns, _status, _accepted in stats["callbacks"]:
        sent[(node_id, attempt)] = sent_ns
        answer_ns.append(answered_ns - sent_ns)
    by_run: dict[str, list[tuple[int, str, int]]] = {r: [] for r in run_ids}
    for arrival, _path, run_id, node_id, attempt in stats["requests"]:
        if run_id in by_run:
            by_run[run_id].append((arrival, node_id, attempt))
    gaps = []
    for reqs in by_run.values():
        reqs.sort()
        for prev, nxt in itertools.pairwise(reqs):
            sent_ns = sent.get((prev[1], prev[2]))
            if sent_ns is not None:
                gaps.append(nxt[0] - sent_ns)
    return gaps, answer_ns


# ---- the AETR API -------------------------------------------------------------------------------------


class ApiError(RuntimeError):
    """AETR answered something other than what the scenario needs."""


async def _json(resp: aiohttp.ClientResponse, expect: Sequence[int]) -> Any:
    body = await resp.read()
    if resp.status not in expect:
        raise ApiError(f"{resp.method} {resp.url.path} answered {resp.status}: {body[:300]!r}")
    return orjson.loads(body) if body else None


async def put_step(ctx: Context, body: dict[str, Any]) -> Any:
    """PUT a step tree; its resolved tree."""
    async with ctx.http.put(f"{ctx.api}/steps/{body['name']}", data=orjson.dumps(body),
                            headers={"Content-Type": "application/json"},
                            timeout=aiohttp.ClientTimeout(total=ctx.timeout(300))) as resp:
        return await _json(resp, (200, 201))


MAX_START_RETRIES: Final = 100  # 503s (a full start queue) one start is sent again after, at most


async def start_run(ctx: Context, step: str, run_input: Any = None, timeout_s: float = 120) -> str:
    """POST /runs; the new run's id. A 503 (the server's start queue full) is sent again after its Retry-After,
    as a client would, and counted in `ctx.refused_starts`."""
    for _ in range(MAX_START_RETRIES):
        async with ctx.http.post(f"{ctx.api}/runs", data=orjson.dumps({"step": step, "input": run_input}),
                                 headers={"Content-Type": "application/json"},
                                 timeout=aiohttp.ClientTimeout(total=ctx.timeout(timeout_s))) as resp:
            if resp.status == 503 and "Retry-After" in resp.headers:
                ctx.refused_starts += 1
                await resp.read()
                await asyncio.sleep(float(resp.headers["Retry-After"]))  # the wait the server asked for
                continue
            run = await _json(resp, (201,))
            return str(run["id"])
    raise ApiError(f"POST /runs answered 503 {MAX_START_RETRIES} times")


async def wait_run(ctx: Context, run_id: str, timeout_s: float = 120) -> dict[str, Any]:
    """The run once it has ended (GET /runs/{id}?wait=), or as it is when `timeout_s` has passed."""
    deadline = time.monotonic() + timeout_s
    while True:
        left = deadline - time.monotonic()
        async with ctx.http.get(f"{ctx.api}/runs/{run_id}", params={"wait": f"{max(0.0, min(left, 30)):.1f}"},
                                timeout=aiohttp.ClientTimeout(total=ctx.timeout(60))) as resp:
            run: dict[str, Any] = await _json(resp, (200,))
        if run["state"] in ("complete", "error", "cancelled") or left <= 0:
            return run


async def get_run(ctx: Context, run_id: str, timeout_s: float = 120) -> dict[str, Any]:
    """GET /runs/{id}: the whole run tree."""
    async with ctx.http.get(f"{ctx.api}/runs/{run_id}", timeout=aiohttp.ClientTimeout(total=ctx.timeout(timeout_s))
                            ) as resp:
        run: dict[str, Any] = await _json(resp, (200,))
        return run


async def count_runs(ctx: Context, step: str, state: str) -> int:
    """How many root runs of `step` are in `state` (follows the pages)."""
    total = 0
    cursor: str | None = None
    for _ in range(10_000):  # a page bound, not a run bound: 500 runs a page
        params = {"step": step, "state": state, "limit": "500", **({"cursor": cursor} if cursor else {})}
        async with ctx.http.get(f"{ctx.api}/runs", params=params,
                                timeout=aiohttp.ClientTimeout(total=ctx.timeout(60))) as resp:
            page = await _json(resp, (200,))
        total += len(page["runs"])
        cursor = page["next_cursor"]
        if not cursor:
            break
    return total


def api_step(name: str, url: str) -> dict[str, Any]:
    """An api step in callback mode with a deadline far beyond any benchmark."""
    return {"name": name, "kind": "api", "url": url, "timeout_s": 3600, "retry": {"max_attempts": 1}}


async def timed(coro: Any) -> tuple[Any, float]:
    """Await `coro`; (its result, seconds it took)."""
    start = time.perf_counter()
    result = await coro
    return result, time.perf_counter() - start


def describe_failures(stats: dict[str, Any]) -> dict[str, Any]:
    """What went wrong on the step service's side, if anything (only present keys when non-zero)."""
    out: dict[str, Any] = {}
    if stats.get("n_callback_errors"):
        out["callback_errors"] = stats["n_callback_errors"]
        out["callback_error_examples"] = stats["callback_errors"][:3]
    redelivered = sum(1 for r in stats["requests"] if r[4] > 1)
    if redelivered:
        out["redelivered_calls"] = redelivered
    return out


__all__ = [
    "ApiError",
    "Context",
    "Phase",
    "Sizes",
    "api_step",
    "chain_gaps",
    "count_runs",
    "describe_failures",
    "get_run",
    "log",
    "ms",
    "percentile",
    "put_step",
    "start_run",
    "timed",
    "wait_run",
]


CALIBRATION_LOOPS: Final = 1_000_000


def calibration_ms() -> float:
    """How fast this machine runs Python right now: the best of 3 timings of a fixed pure-Python loop, in ms.

    Results from different machines (or one VM on a slower host) compare only alongside it: every AETR
    number here is bound by how fast one core runs the interpreter.
    """
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        total = 0
        for i in range(CALIBRATION_LOOPS):
            total += i
        best = min(best, time.perf_counter() - started)
    return round(best * 1000, 1)
