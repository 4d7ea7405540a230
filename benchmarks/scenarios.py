"""The benchmark scenarios behind the performance targets: chain, throughput, fan-out, load and sandbox.

Each takes a Context (a fresh database, a fresh `aetr serve`, a fresh step service) and returns the metrics
of one JSON result line; `Case.targets` says which of them a target bounds.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

import aiohttp
import orjson

from aetr.sandbox import Sandbox
from aetr.store import open_store
from aetr.store.store import count_round_trips
from benchmarks.common import (
    ApiError,
    Context,
    Phase,
    api_step,
    chain_gaps,
    count_runs,
    describe_failures,
    get_run,
    log,
    ms,
    percentile,
    put_step,
    start_run,
    wait_run,
)
from benchmarks.purge import purge
from benchmarks.sandbox_bench import MAPPER, one_kilobyte_input

Metrics = dict[str, Any]
RUN_WAIT_S: Final = 120.0  # seconds one chain run may take before the scenario gives up
# The engine-level mapper check keeps the 1 KB value flowing from step to step.
MAP_LARGE_WAIT_S: Final = 300.0  # seconds the large map may take to call, answer and complete
PASS_THROUGH_MAPPER: Final = "(input, ctx) => ({ ...input, index: ctx.index })"


@dataclass(frozen=True)
class Bound:
    """A target: `metric` must be at most (or at least) `value`."""

    metric: str
    value: float
    at_most: bool = True

    @property
    def key(self) -> str:
        """How the target is named in the JSON line."""
        return f"{self.metric}_{'max' if self.at_most else 'min'}"

    def met(self, metrics: Metrics) -> bool:
        """Whether `metrics` satisfies this bound (a missing or NaN metric does not)."""
        got = metrics.get(self.metric)
        if not isinstance(got, int | float) or math.isnan(got):
            return False
        return got <= self.value if self.at_most else got >= self.value


@dataclass(frozen=True)
class Case:
    """One scenario at one size: what it is called, how to run it, and its targets per database."""

    scenario: str
    label: str
    run: Callable[[Context], Awaitable[Metrics]]
    targets: Callable[[str], list[Bound]]
    deadline_s: float  # seconds the whole case may take (scaled by --timeout-factor)


def pg(phase: Phase) -> Metrics:
    """The PostgreSQL session counts of a phase when there are any, the AETR processes' instructions, and the
    server's cycle collections per generation."""
    out: Metrics = {"pg_sessions": phase.pg_sessions} if phase.pg_sessions else {}
    if phase.instructions_m is not None:
        out["aetr_instructions_m"] = phase.instructions_m
    if phase.gc_collections is not None:
        out["aetr_gc_collections"] = phase.gc_collections
    return out


# ---- chain -------------------------------------------------------------------------------------------


async def _run_sequence(ctx: Context, step: str, n_steps: int, run_input: Any = None) -> tuple[str, int]:
    """Start one run of a sequential tree and wait for its last callback; (run id, POST send time in ns)."""
    before = (await ctx.svc.wait(ctx.http, 1, accepted=0))["accepted"]
    sent = time.time_ns()
    run_id = await start_run(ctx, step, run_input)
    await ctx.svc.wait(ctx.http, ctx.timeout(RUN_WAIT_S), accepted=before + n_steps)
    return run_id, sent


async def chain(ctx: Context) -> Metrics:
    """A sequential tree of api steps, runs one after another: per-step overhead and steps per second."""
    n, runs = ctx.sizes.chain_steps, ctx.sizes.chain_runs
    await put_step(ctx, {"name": "chain", "kind": "sequential",
                         "children": [{"step": api_step(f"chain-{i:03d}", f"{ctx.svc.url}/step")} for i in range(n)]})
    await _run_sequence(ctx, "chain", n)  # warm-up: imports, caches, the first connections
    await ctx.svc.reset(ctx.http)
    started: list[tuple[str, int]] = []
    async with ctx.measure("runs") as phase:
        for _ in range(runs):
            started.append(await _run_sequence(ctx, "chain", n))
    stats = await ctx.svc.stats(ctx.http)
    ids = [r for r, _ in started]
    gaps, answers = chain_gaps(stats, ids)
    last_answer: dict[str, int] = {}
    run_of = {node: run for _, _, run, node, _ in stats["requests"]}
    first_call: dict[str, int] = {}
    for arrival, _path, run, _node, _attempt in stats["requests"]:
        first_call[run] = min(first_call.get(run, arrival), arrival)
    for node, _attempt, _sent, answered, _status, _ok in stats["callbacks"]:
        run = run_of.get(node, "")
        last_answer[run] = max(last_answer.get(run, 0), answered)
    busy_ns = sum(last_answer[r] - t for r, t in started if r in last_answer)
    incomplete = [r for r in ids if (await get_run(ctx, r))["state"] != "complete"]
    return {
        "steps": n, "runs": runs, "gaps": len(gaps),
        "p50_ms": ms(percentile(gaps, 0.5)), "p99_ms": ms(percentile(gaps, 0.99)),
        "max_ms": ms(max(gaps, default=math.nan)),
        "steps_per_s": round(n * runs / (busy_ns / 1e9), 1) if busy_ns else math.nan,
        "callback_answer_p50_ms": ms(percentile(answers, 0.5)),
        "first_call_p50_ms": ms(percentile([first_call[r] - t for r, t in started if r in first_call], 0.5)),
        "runs_not_complete": len(incomplete), "cpu_s": phase.cpu_s, **pg(phase), **describe_failures(stats),
    }


# ---- throughput --------------------------------------------------------------------------------------


async def throughput(ctx: Context) -> Metrics:
    """Many runs of a short sequence, all started together: runs and step transitions per second."""
    n_runs, n_steps = ctx.sizes.throughput_runs, ctx.sizes.throughput_steps
    await put_step(ctx, {"name": "seq", "kind": "sequential",
                         "children": [{"step": api_step(f"seq-{i}", f"{ctx.svc.url}/step")} for i in range(n_steps)]})
    warm = ctx.sizes.warmup_runs
    await asyncio.gather(*(start_run(ctx, "seq") for _ in range(warm)))
    await ctx.svc.wait(ctx.http, ctx.timeout(RUN_WAIT_S), accepted=warm * n_steps)
    await ctx.svc.reset(ctx.http)
    statuses: list[str] = []

    async def one() -> None:
        try:
            await start_run(ctx, "seq", {"n": len(statuses)}, timeout_s=300)
            statuses.append("ok")
        except (ApiError, aiohttp.ClientError, TimeoutError) as exc:
            statuses.append(f"{type(exc).__name__}: {exc}")

    async with ctx.measure("runs") as phase:
        t0 = time.time_ns()
        await asyncio.gather(*(one() for _ in range(n_runs)))
        posted_ns = time.time_ns()
        started_ok = statuses.count("ok")
        await ctx.svc.wait(ctx.http, ctx.timeout(600), accepted=started_ok * n_steps)
    stats = await ctx.svc.stats(ctx.http)
    end_ns = max(c[3] for c in stats["callbacks"])
    seconds = (end_ns - t0) / 1e9
    complete = await count_runs(ctx, "seq", "complete") - warm
    transitions = stats["accepted"]
    return {
        "runs": n_runs, "steps_per_run": n_steps, "runs_started": started_ok, "runs_complete": complete,
        "seconds": round(seconds, 3), "start_phase_s": round((posted_ns - t0) / 1e9, 3),
        "runs_per_s": round(complete / seconds, 1), "transitions_per_s": round(transitions / seconds, 1),
        "callback_answer_p50_ms": ms(percentile([c[3] - c[2] for c in stats["callbacks"]], 0.5)),
        "callback_answer_p99_ms": ms(percentile([c[3] - c[2] for c in stats["callbacks"]], 0.99)),
        "start_errors": [s for s in statuses if s != "ok"][:3], "starts_refused_503": ctx.refused_starts,
        "cpu_s": phase.cpu_s, **pg(phase),
        **describe_failures(stats),
    }


# ---- fan-out -----------------------------------------------------------------------------------------


def fanout(n: int) -> Callable[[Context], Awaitable[Metrics]]:
    """A parallel parent of `n` api children with the array reducer: time to call them all, to complete, RSS."""

    async def run(ctx: Context) -> Metrics:
        await put_step(ctx, api_step("leaf", f"{ctx.svc.url}/step"))
        await put_step(ctx, {"name": "fan", "kind": "parallel", "reducer": "array",
                             "children": [{"step": "leaf"}] * n})
        rss_before = ctx.server.peak_rss_mb()
        metrics, _run_id = await _time_fan(ctx, "fan", {"source": "bench"}, n, "run")
        return {"children": n, **metrics, "rss_before_run_mb": round(rss_before or math.nan, 1)}

    return run


async def _time_fan(ctx: Context, step: str, run_input: Any, n: int, phase_name: str,
                    deadline_s: float | None = None) -> tuple[Metrics, str]:
    """Start one run of `step` whose `n` api leaves call /step, and time it as the fan-out scenario does: the
    run's creation, the last leaf's call, the root's completion (its completed_at, or the last callback's
    answer when later); (metrics, run id)."""
    deadline = ctx.timeout(deadline_s or max(120.0, n * 0.2))
    async with ctx.measure(phase_name) as phase:
        t0 = time.time_ns()
        run_id = await start_run(ctx, step, run_input, timeout_s=deadline)
        posted_ns = time.time_ns()
        log(f"{step} {n}: run started after {(posted_ns - t0) / 1e9:.2f} s; waiting for the calls")
        await ctx.svc.wait(ctx.http, deadline, requests=n)
        log(f"{step} {n}: every child called after {(time.time_ns() - t0) / 1e9:.2f} s")
        await ctx.svc.wait(ctx.http, deadline, accepted=n)
        # On SQLite the last callback's own transaction completes the root; on PostgreSQL the children are
        # counted after their commits and the last count completes the root in an event of its own.
        run = await wait_run(ctx, run_id, timeout_s=deadline)
    stats = await ctx.svc.stats(ctx.http)
    output = run.get("output")
    last = max(stats["callbacks"], key=lambda c: c[3])
    completed_ns = int(datetime.fromisoformat(run["completed_at"]).timestamp() * 1e9) if run.get(
        "completed_at") else max(c[3] for c in stats["callbacks"])
    return {
        "run_created_s": round((posted_ns - t0) / 1e9, 3),
        "all_called_s": round((max(r[0] for r in stats["requests"]) - t0) / 1e9, 3),
        "root_complete_s": round((max(completed_ns, last[3]) - t0) / 1e9, 3),
        "root_state": run["state"], "output_len": len(output) if isinstance(output, list) else None,
        "peak_rss_mb": round(ctx.server.peak_rss_mb() or math.nan, 1),
        "sandbox_peak_rss_mb": ctx.server.sandbox_peak_rss_mb(),
        "callback_answer_p50_ms": ms(percentile([c[3] - c[2] for c in stats["callbacks"]], 0.5)),
        "callback_answer_max_ms": ms(max(c[3] - c[2] for c in stats["callbacks"])),
        "last_callback_answer_ms": ms(last[3] - last[2]),
        "cpu_s": phase.cpu_s, **pg(phase), **describe_failures(stats),
    }, run_id


# ---- map ---------------------------------------------------------------------------------------------

_map_order = itertools.count()  # each map case alternates which of its two runs goes first


async def map_vs_parallel(ctx: Context) -> Metrics:
    """A map of n items over fan-out's api step against a parallel of n children of the same step, on one
    server and database: both runs timed as the fan-out scenario times its run, and their ratio."""
    return await _map_vs_parallel(ctx, ctx.sizes.map_items, map_first=next(_map_order) % 2 == 0)


async def _map_vs_parallel(ctx: Context, n: int, map_first: bool) -> Metrics:
    await put_step(ctx, api_step("leaf", f"{ctx.svc.url}/step"))
    await put_step(ctx, {"name": "fan", "kind": "parallel", "reducer": "array", "children": [{"step": "leaf"}] * n})
    await put_step(ctx, {"name": "each", "kind": "map", "child": {"step": "leaf", "mapper": None},
                         "reducer": "array"})
    # A small run of each first, unmeasured: imports, caches and connections are warm for both alike.
    warm = min(n, 50)
    await put_step(ctx, {"name": "fan-warm", "kind": "parallel", "children": [{"step": "leaf"}] * warm})
    for step, body in (("fan-warm", {"source": "bench"}), ("each", list(range(warm)))):
        await wait_run(ctx, await start_run(ctx, step, body))
    await ctx.svc.wait(ctx.http, ctx.timeout(RUN_WAIT_S), accepted=2 * warm)
    order = ("map", "parallel") if map_first else ("parallel", "map")
    results: dict[str, Metrics] = {}
    for kind in order:
        await ctx.svc.reset(ctx.http)
        step, body = ("each", list(range(n))) if kind == "map" else ("fan", {"source": "bench"})
        results[kind], _ = await _time_fan(ctx, step, body, n, kind)
    got, base = results["map"], results["parallel"]
    return {
        "items": n, "first": order[0],
        "map_complete_s": got["root_complete_s"], "parallel_complete_s": base["root_complete_s"],
        "map_to_parallel": round(got["root_complete_s"] / base["root_complete_s"], 3),
        "map_all_called_s": got["all_called_s"], "parallel_all_called_s": base["all_called_s"],
        "map_run_created_s": got["run_created_s"], "parallel_run_created_s": base["run_created_s"],
        "map_state": got["root_state"], "map_output_len": got["output_len"],
        "parallel_state": base["root_state"], "parallel_output_len": base["output_len"],
        "peak_rss_mb": round(ctx.server.peak_rss_mb() or math.nan, 1),
        "map_cpu_s": got["cpu_s"], "parallel_cpu_s": base["cpu_s"],
        **{f"map_{k}": v for k, v in got.items() if k in ("callback_errors", "redelivered_calls", "pg_sessions")},
        **{f"parallel_{k}": v for k, v in base.items()
           if k in ("callback_errors", "redelivered_calls", "pg_sessions")},
    }


async def map_large(ctx: Context) -> Metrics:
    """A map of a few items (10,000 at the reference size) then one of many (100,000): that the large one
    completes, the server's peak RSS, and GET /runs/{id} of the large run against the same GET of the small."""
    small, large, samples = ctx.sizes.map_items, ctx.sizes.map_large_items, ctx.sizes.map_large_samples
    await put_step(ctx, api_step("leaf", f"{ctx.svc.url}/step"))
    await put_step(ctx, {"name": "each", "kind": "map", "child": {"step": "leaf", "mapper": None},
                         "reducer": "array"})
    small_metrics, small_id = await _time_fan(ctx, "each", list(range(small)), small, "small")
    rss_small = ctx.server.peak_rss_mb()
    await ctx.svc.reset(ctx.http)
    out: Metrics = {"items": large, "small_items": small, "small_complete_s": small_metrics["root_complete_s"],
                    "peak_rss_after_small_mb": round(rss_small or math.nan, 1)}
    try:
        got, large_id = await _time_fan(ctx, "each", list(range(large)), large, "large",
                                        deadline_s=MAP_LARGE_WAIT_S)
    except (TimeoutError, ApiError, aiohttp.ClientError) as exc:  # report what was seen, not only the error
        counts = await ctx.svc.wait(ctx.http, 0.001)
        return {**out, "error": f"{type(exc).__name__}: {exc}"[:500], "seen_at_failure": counts,
                "peak_rss_mb": round(ctx.server.peak_rss_mb() or math.nan, 1)}
    out.update({f"large_{k}": v for k, v in got.items() if k != "peak_rss_mb"})
    out["peak_rss_mb"] = round(ctx.server.peak_rss_mb() or math.nan, 1)
    async with ctx.measure("get"):
        small_ms, small_bytes = await _time_get(ctx, f"/runs/{small_id}", samples)
        large_ms, large_bytes = await _time_get(ctx, f"/runs/{large_id}", samples)
    out.update({
        "get_small_ms": round(percentile(small_ms, 0.5), 1), "get_small_bytes": small_bytes,
        "get_large_ms": round(percentile(large_ms, 0.5), 1), "get_large_ms_max": round(max(large_ms), 1),
        "get_large_bytes": large_bytes,
        "get_ratio": round(percentile(large_ms, 0.5) / percentile(small_ms, 0.5), 2),
        "peak_rss_after_get_mb": round(ctx.server.peak_rss_mb() or math.nan, 1),
    })
    return out


# ---- api max_concurrency -----------------------------------------------------------------------------

_limit_order = itertools.count()  # each concurrency case rotates which of its bursts goes first
PAIRS: Final = 3  # limited and chains bursts in one concurrency case, alternating


async def concurrency(ctx: Context) -> Metrics:
    """`n` calls of an api step with max_concurrency `limit`, against the same `n` calls with no limit made two
    ways: `n` runs of one step started together (up to `n` in flight: the first comparison made), and `limit`
    runs of a sequence of `n / limit` steps started together (`limit` in flight, no limit set: the same
    concurrency without the slot machinery).

    The step service holds its callbacks while the runs start and their first calls arrive, then sends them all:
    the steady pace is the calls answered from that moment to the last one, with `limit` in flight throughout
    and no run starting (the starts' cost and ramp are in the whole burst's figure, not in it). Also the most
    calls in flight at the step service."""
    n, limit = ctx.sizes.concurrency_runs, ctx.sizes.concurrency_limit
    await put_step(ctx, api_step("free", f"{ctx.svc.url}/step"))
    await put_step(ctx, {**api_step("limited", f"{ctx.svc.url}/step"), "max_concurrency": limit})
    await put_step(ctx, {"name": "chains", "kind": "sequential", "children": [{"step": "free"}] * (n // limit)})
    warm = ctx.sizes.warmup_runs
    for step in ("free", "limited"):
        await asyncio.gather(*(start_run(ctx, step) for _ in range(warm)))
    await ctx.svc.wait(ctx.http, ctx.timeout(RUN_WAIT_S), accepted=2 * warm)
    await ctx.svc.reset(ctx.http)
    await wait_run(ctx, await start_run(ctx, "chains"), timeout_s=ctx.timeout(RUN_WAIT_S))
    # The limited and the chains bursts alternate, PAIRS of each, so that the machine's drift within the case
    # (a slower minute, autovacuum after the free burst) falls on both; the free burst once, in a rotating place.
    shift = next(_limit_order)
    order = [step for i in range(PAIRS) for step in (("limited", "chains") if (i + shift) % 2 == 0
                                                      else ("chains", "limited"))]
    order.insert(shift % (len(order) + 1), "free")
    bursts: dict[str, list[Metrics]] = {"limited": [], "free": [], "chains": []}
    for step in order:
        await ctx.svc.reset(ctx.http)
        runs, calls, first = {"chains": (limit, n // limit * limit, limit), "limited": (n, n, limit),
                              "free": (n, n, n)}[step]
        before = await count_runs(ctx, step, "complete")
        got = await _burst(ctx, step, runs, calls, first)
        got["runs_complete"] = await count_runs(ctx, step, "complete") - before
        bursts[step].append(got)
    ratios = [lim["steady_calls_per_s"] / ch["steady_calls_per_s"]
              for lim, ch in zip(bursts["limited"], bursts["chains"], strict=True)]

    def median(step: str, key: str) -> float:
        return round(statistics.median(b[key] for b in bursts[step]), 1)

    free, limited, chains = (bursts[step][0] for step in ("free", "limited", "chains"))
    whole = ("calls_per_s", "steady_calls_per_s", "in_flight_max", "in_flight_to_callback_max")
    return {
        "runs": n, "limit": limit, "order": "".join(step[0] for step in order),
        "limited_calls_per_s": median("limited", "calls_per_s"), "free_calls_per_s": free["calls_per_s"],
        "chains_calls_per_s": median("chains", "calls_per_s"),
        "limited_to_free": round(median("limited", "calls_per_s") / free["calls_per_s"], 3),
        "limited_to_chains": round(median("limited", "calls_per_s") / median("chains", "calls_per_s"), 3),
        "limited_steady_calls_per_s": median("limited", "steady_calls_per_s"),
        "chains_steady_calls_per_s": median("chains", "steady_calls_per_s"),
        "free_steady_calls_per_s": free["steady_calls_per_s"],
        "limited_to_chains_steady": round(statistics.median(ratios), 3),
        "limited_to_chains_steady_pairs": [round(r, 3) for r in ratios],
        "limited_in_flight_max": max(b["in_flight_max"] for b in bursts["limited"]),
        "free_in_flight_max": free["in_flight_max"],
        "chains_in_flight_max": max(b["in_flight_max"] for b in bursts["chains"]),
        "limited_in_flight_to_callback_max": max(b["in_flight_to_callback_max"] for b in bursts["limited"]),
        "free_in_flight_to_callback_max": free["in_flight_to_callback_max"],
        "limited_runs_complete": sum(b["runs_complete"] for b in bursts["limited"]),
        "chains_runs_complete": sum(b["runs_complete"] for b in bursts["chains"]),
        "free_runs_complete": free["runs_complete"],
        **{f"{name}_{k}": v for name, got in (("free", free), ("limited", limited), ("chains", chains))
           for k, v in got.items() if k not in (*whole, "runs_complete")},
    }


async def _burst(ctx: Context, step: str, runs: int, calls: int, first: int) -> Metrics:
    """`runs` runs of `step` started together as the throughput scenario starts them, their callbacks held until
    every run has started and the `first` calls they make at once have arrived, then sent; until the `calls`
    they make have every callback accepted. Calls per second over the whole burst and from the release (the
    steady pace), and the calls in flight at the step service."""
    statuses: list[str] = []

    async def one() -> None:
        try:
            await start_run(ctx, step, {"n": len(statuses)}, timeout_s=300)
            statuses.append("ok")
        except (ApiError, aiohttp.ClientError, TimeoutError) as exc:
            statuses.append(f"{type(exc).__name__}: {exc}")

    await ctx.svc.gate(ctx.http, closed=True)
    t0 = time.time_ns()
    try:
        await asyncio.gather(*(one() for _ in range(runs)))
        posted_ns = time.time_ns()
        await ctx.svc.wait(ctx.http, ctx.timeout(600), requests=first)
    except BaseException:
        await ctx.svc.gate(ctx.http, closed=False)
        raise
    async with ctx.measure(step) as phase:  # CPU (and a profile) of the steady part alone
        released = await ctx.svc.gate(ctx.http, closed=False)
        await ctx.svc.wait(ctx.http, ctx.timeout(600), accepted=statuses.count("ok") * (calls // runs))
    stats = await ctx.svc.stats(ctx.http)
    last_ns = max(c[3] for c in stats["callbacks"])
    seconds, steady_s = (last_ns - t0) / 1e9, (last_ns - released["at"]) / 1e9
    return {
        "calls_per_s": round(stats["accepted"] / seconds, 1), "seconds": round(seconds, 3),
        "steady_calls_per_s": round(stats["accepted"] / steady_s, 1), "steady_s": round(steady_s, 3),
        "held": released["released"], "start_phase_s": round((posted_ns - t0) / 1e9, 3),
        "in_flight_max": in_flight_max(stats, answered=True),
        "in_flight_to_callback_max": in_flight_max(stats, answered=False),
        "start_errors": [s for s in statuses if s != "ok"][:3],
        "callback_answer_p50_ms": ms(percentile([c[3] - c[2] for c in stats["callbacks"]], 0.5)),
        "steady_cpu_ms_per_call": {k: round(v * 1000 / max(stats["accepted"], 1), 3)
                                   for k, v in phase.cpu_s.items() if k in ("aetr", "postgres", "stepsvc")},
        "cpu_s": phase.cpu_s, **pg(phase), **describe_failures(stats),
    }


def in_flight_max(stats: dict[str, Any], answered: bool) -> int:
    """The most calls in flight at once as the step service saw them: each from its request's arrival to the
    moment AETR answered its callback (`answered`; a bound from above: AETR frees the slot in the callback's
    transaction, before its answer arrives), or to the moment the callback was sent (a bound from below: this
    service sends it at once). A call whose callback was never answered stays in flight."""
    ends = {(c[0], c[1]): c[3] if answered else c[2] for c in stats["callbacks"]}
    events = []
    for arrival, _path, _run, node, attempt in stats["requests"]:
        events.append((arrival, 1))
        if (end := ends.get((node, attempt))) is not None:
            events.append((end, -1))
    held = most = 0
    for _at, delta in sorted(events):  # at equal times the end (-1) sorts first
        held += delta
        most = max(most, held)
    return most


# ---- load --------------------------------------------------------------------------------------------


async def _time_get(ctx: Context, path: str, samples: int, warm: int = 2) -> tuple[list[float], int]:
    """Milliseconds of each of `samples` GETs of `path` (after `warm` unmeasured ones), and the body size."""
    timings = []
    size = 0
    for i in range(warm + samples):
        start = time.perf_counter()
        async with ctx.http.get(f"{ctx.api}{path}", timeout=aiohttp.ClientTimeout(total=ctx.timeout(120))) as resp:
            body = await resp.read()
            if resp.status != 200:
                raise ApiError(f"GET {path} answered {resp.status}: {body[:200]!r}")
        if i >= warm:
            timings.append((time.perf_counter() - start) * 1000)
        size = len(body)
    return timings, size


async def load(ctx: Context) -> Metrics:
    """GET a big run and a big step tree: milliseconds over HTTP, and SQL round trips in the store."""
    n_run, n_tree, samples = ctx.sizes.load_run_nodes, ctx.sizes.load_tree_nodes, ctx.sizes.load_samples
    await put_step(ctx, {"name": "tree", "kind": "parallel", "children": [
        {"step": api_step(f"tree-{i:04d}", f"{ctx.svc.url}/hold")} for i in range(n_tree - 1)]})
    await put_step(ctx, api_step("leaf", f"{ctx.svc.url}/step"))
    await put_step(ctx, {"name": "wide", "kind": "parallel", "children": [{"step": "leaf"}] * (n_run - 1)})
    wait = ctx.timeout(max(120.0, n_run * 0.2))
    run_id = await start_run(ctx, "wide", {"source": "bench"}, timeout_s=wait)
    await ctx.svc.wait(ctx.http, wait, accepted=n_run - 1)
    if (state := (await wait_run(ctx, run_id, timeout_s=wait))["state"]) != "complete":
        raise ApiError(f"the {n_run}-node run is {state} after its last callback, not complete")
    async with ctx.measure("get") as phase:
        run_ms, run_bytes = await _time_get(ctx, f"/runs/{run_id}", samples)
        tree_ms, tree_bytes = await _time_get(ctx, "/steps/tree", samples * 2)
    store = open_store(ctx.database_url)
    try:
        await store.get_run_json(run_id)  # warm: the first use opens a connection and may introspect the server
        await store.get_step_tree("tree")
        with count_round_trips() as run_sql:
            start = time.perf_counter()
            body = await store.get_run_json(run_id)  # GET /runs/{id}'s answer
            store_run_ms = (time.perf_counter() - start) * 1000
        nodes = _count_nodes(orjson.loads(body)) if body else 0
        with count_round_trips() as tree_sql:
            start = time.perf_counter()
            tree = await store.get_step_tree("tree")
            store_tree_ms = (time.perf_counter() - start) * 1000
    finally:
        await store.close()
    if nodes != n_run or tree is None or len(tree.children) != n_tree - 1:
        raise ApiError(f"the store read {nodes} run nodes and a tree of "
                       f"{len(tree.children) + 1 if tree else 0} steps; expected {n_run} and {n_tree}")
    return {
        "run_nodes": n_run, "tree_nodes": n_tree, "gets": samples,
        "run_ms": round(percentile(run_ms, 0.5), 1), "run_ms_max": round(max(run_ms), 1), "run_bytes": run_bytes,
        "run_round_trips": len(run_sql), "store_run_ms": round(store_run_ms, 1),
        "tree_ms": round(percentile(tree_ms, 0.5), 1), "tree_bytes": tree_bytes,
        "tree_round_trips": len(tree_sql), "store_tree_ms": round(store_tree_ms, 1), "cpu_s": phase.cpu_s,
    }


# ---- sandbox -----------------------------------------------------------------------------------------


async def sandbox(ctx: Context) -> Metrics:
    """Mapper call overhead on a 1 KB input: in the sandbox itself, through /sandbox/evaluate, and in a run."""
    data = one_kilobyte_input()
    args: list[object] = [data, {"run": {"id": "r-1", "input": data}, "step": {"name": "map"}, "index": 0}]
    calls = ctx.sizes.sandbox_calls
    direct = await _sandbox_calls(ctx, data, args, calls)
    async with ctx.measure("evaluate") as phase:
        over_http = await _evaluate_calls(ctx, data)
    in_run = await _mapper_in_runs(ctx, data)
    return {"input_bytes": len(orjson.dumps(data)), "calls": calls,
            "p50_ms": round(percentile(direct, 0.5), 3), "p99_ms": round(percentile(direct, 0.99), 3),
            "evaluate_http_p50_ms": round(percentile(over_http, 0.5), 3), **in_run, "cpu_s": phase.cpu_s}


async def _sandbox_calls(ctx: Context, data: dict[str, Any], args: list[object], calls: int) -> list[float]:
    """Milliseconds of each of `calls` mapper calls in a sandbox of this process (after a warm-up)."""
    with Sandbox(pool_size=1) as box:
        for _ in range(min(500, calls // 2)):
            await box.acall(MAPPER, args)
        direct = []
        async with ctx.measure("direct"):  # ends before the sandbox closes, so its worker's CPU is counted
            for _ in range(calls):
                start = time.perf_counter()
                await box.acall(MAPPER, args)
                direct.append((time.perf_counter() - start) * 1000)
    return direct


async def _evaluate_calls(ctx: Context, data: dict[str, Any]) -> list[float]:
    """Milliseconds of each POST /sandbox/evaluate of the benchmark mapper (after 20 unmeasured ones)."""
    body = orjson.dumps({"source": MAPPER, "input": data})
    over_http = []
    for i in range(ctx.sizes.sandbox_http_calls + 20):
        start = time.perf_counter()
        async with ctx.http.post(f"{ctx.api}/sandbox/evaluate", data=body,
                                 headers={"Content-Type": "application/json"}) as resp:
            answer = orjson.loads(await resp.read())
            if not answer.get("ok"):
                raise ApiError(f"/sandbox/evaluate refused the benchmark mapper: {answer}")
        if i >= 20:
            over_http.append((time.perf_counter() - start) * 1000)
    return over_http


async def _mapper_in_runs(ctx: Context, data: dict[str, Any]) -> Metrics:
    """Per-step gap of a chain passing 1 KB along, with and without a mapper on every link: the difference."""
    n, runs = ctx.sizes.mapper_chain_steps, ctx.sizes.mapper_chain_runs
    for name, mapper in (("plain", None), ("mapped", PASS_THROUGH_MAPPER)):
        children = [{"step": api_step(f"{name}-{i:03d}", f"{ctx.svc.url}/echo"),
                     **({"mapper": mapper} if mapper else {})} for i in range(n)]
        await put_step(ctx, {"name": name, "kind": "sequential", "children": children})
    await _run_sequence(ctx, "plain", n, data)
    await _run_sequence(ctx, "mapped", n, data)
    ids: dict[str, list[str]] = {"plain": [], "mapped": []}
    async with ctx.measure("mapper-runs"):
        for _ in range(runs):  # alternate, so drift in the machine's load hits both alike
            for name in ids:
                ids[name].append((await _run_sequence(ctx, name, n, data))[0])
    stats = await ctx.svc.stats(ctx.http)
    plain = percentile(chain_gaps(stats, ids["plain"])[0], 0.5)
    mapped = percentile(chain_gaps(stats, ids["mapped"])[0], 0.5)
    return {"run_gap_plain_p50_ms": ms(plain), "run_gap_mapped_p50_ms": ms(mapped),
            "in_run_mapper_overhead_ms": ms(mapped - plain)}


# ---- the cases ---------------------------------------------------------------------------------------


async def stored_runs(ctx: Context) -> Metrics:
    """The stored scenario (benchmarks/stored.py, which measures with this module's chain and throughput)."""
    from benchmarks.stored import stored

    return await stored(ctx)


def cases(fanout_sizes: tuple[int, ...]) -> list[Case]:
    """Every case, in the order they run."""
    out = [
        Case("chain", "chain", chain, lambda db: [Bound("p50_ms", 2.5), Bound("p99_ms", 10.0)], 1800),
        Case("throughput", "throughput", throughput,
             lambda db: [Bound("transitions_per_s", 800.0 if db == "postgres" else 1000.0, at_most=False)], 1800),
    ]
    for n in fanout_sizes:
        def targets(db: str, n: int = n) -> list[Bound]:
            if n >= 10_000:
                return [Bound("root_complete_s", 12.0), Bound("peak_rss_mb", 300.0)]
            return [Bound("root_complete_s", 1.5)] if n >= 1_000 else []

        out.append(Case("fanout", f"fanout-{n}", fanout(n), targets, 3600))
    out += [
        Case("load", "load", load, lambda db: [Bound("run_ms", 150.0), Bound("run_round_trips", 1),
                                               Bound("tree_round_trips", 1)], 3600),
        Case("sandbox", "sandbox", sandbox, lambda db: [Bound("p50_ms", 0.5)], 900),
        Case("map", "map", map_vs_parallel, lambda db: [Bound("map_to_parallel", 1.1)], 1800),
        Case("map-large", "map-large", map_large,
             lambda db: [Bound("large_output_len", 100_000, at_most=False), Bound("peak_rss_mb", 500.0),
                         Bound("get_ratio", 15.0)], 1800),
        Case("concurrency", "concurrency", concurrency,
             lambda db: [Bound("limited_to_chains_steady", 0.9, at_most=False),
                         Bound("limited_in_flight_to_callback_max", 50)], 1800),
        # Not run unless asked for (--scenario stored): it stores 1,000,000 runs.
        Case("stored", "stored", stored_runs,
             lambda db: [Bound("chain_p50_ratio", 1.10), Bound("chain_p99_ratio", 1.10),
                         Bound("throughput_ratio", 0.90, at_most=False), Bound("list_first_ms", 20.0),
                         Bound("list_filtered_max_ms", 50.0)], 3600),
        # Not run unless asked for (--scenario purge): it stores 100,000 runs first.
        Case("purge", "purge", purge, lambda db: [Bound("callback_answer_p99_ratio", 1.10),
                                                  Bound("transition_p99_ratio", 1.10)], 3600),
    ]
    return out


def _count_nodes(run: dict[str, Any]) -> int:
    count, stack = 0, [run]
    while stack:
        node = stack.pop()
        count += 1
        stack.extend(node["children"])
    return count
