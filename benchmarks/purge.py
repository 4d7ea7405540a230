"""The purge scenario: does deleting many ended runs hold up running work?

100,000 ended 3-step runs are stored in bulk (benchmarks.bulk), then the throughput scenario's workload (runs of
a 3-step sequence) runs twice on the same server, started at a steady rate rather than all at once: once
quietly, once while `POST /retention/purge` deletes those runs beside it, in the batches and pauses retention uses.
The p99 of running work — how long AETR takes to answer a step's callback, and from a step's callback to the
next step's call (a transition) — is compared between the two. Deleting slows down while work runs
(`BUSY_PAUSE_S` between batches), so the runs the purge deleted during the second phase are reported too.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import aiohttp
import orjson

from aetr.engine.retention import BATCH_RUNS, BUSY_PAUSE_S, PAUSE_S
from benchmarks.bulk import load_ended_runs
from benchmarks.common import Context, api_step, chain_gaps, log, ms, percentile, put_step, start_run

PURGED_METRIC: Final = 'aetr_runs_deleted_total{how="purge"} '  # in /metrics
STORED_RUNS: Final = 100_000
STORED_STEPS: Final = 3
WORKLOAD_RATE: Final = 50.0  # runs started a second: 150 step transitions a second, a third of this machine's
WORKLOAD_S: Final = 20.0  # seconds each phase starts runs for (1,000 runs, 3,000 callbacks and 2,000 transitions)
PURGE_HEAD_START_S: Final = 1.0  # seconds the purge runs before the workload starts: its batches are under way
PURGE_WAIT_S: Final = 1_800.0  # seconds the purge may take
RUN_WAIT_S: Final = 120.0  # seconds the warm-up runs may take
Metrics = dict[str, Any]


async def _workload(ctx: Context, name: str, rate: float, seconds: float) -> Metrics:
    """Runs of the 3-step sequence `seq` started at a steady `rate` a second for `seconds`, as running work keeps
    coming (a burst of starts would measure its own queue); the p99s of running work while they ran."""
    await ctx.svc.reset(ctx.http)
    loop = asyncio.get_running_loop()
    n_runs = int(rate * seconds)
    async with ctx.measure(name) as phase:
        t0, started = time.time_ns(), loop.time()
        starts = []
        for i in range(n_runs):
            await asyncio.sleep(max(0.0, started + i / rate - loop.time()))
            starts.append(asyncio.create_task(start_run(ctx, "seq", {"n": i}, timeout_s=300)))
        ids = await asyncio.gather(*starts)
        await ctx.svc.wait(ctx.http, ctx.timeout(600), accepted=n_runs * STORED_STEPS)
    stats = await ctx.svc.stats(ctx.http)
    gaps, answers = chain_gaps(stats, ids)
    seconds_taken = (max(c[3] for c in stats["callbacks"]) - t0) / 1e9
    return {f"{name}_callback_answer_p99_ms": ms(percentile(answers, 0.99)),
            f"{name}_callback_answer_p50_ms": ms(percentile(answers, 0.5)),
            f"{name}_transition_p99_ms": ms(percentile(gaps, 0.99)),
            f"{name}_transition_p50_ms": ms(percentile(gaps, 0.5)),
            f"{name}_transitions_per_s": round(stats["accepted"] / seconds_taken, 1),
            f"{name}_cpu_s": phase.cpu_s}


async def _purge(ctx: Context, older_than_s: float) -> tuple[int, float]:
    """POST /retention/purge; (runs deleted, seconds it took)."""
    t0 = time.monotonic()
    async with ctx.http.post(f"{ctx.api}/retention/purge", data=orjson.dumps({"older_than_s": older_than_s}),
                             headers={"Content-Type": "application/json"},
                             timeout=aiohttp.ClientTimeout(total=ctx.timeout(PURGE_WAIT_S))) as resp:
        body = await resp.read()
        assert resp.status == 200, body
    return int(orjson.loads(body)["deleted"]), time.monotonic() - t0


async def _purged(ctx: Context) -> int:
    """Runs deleted by purges so far, from the server's /metrics."""
    async with ctx.http.get(ctx.server.url + "/metrics") as response:
        text = await response.text()
    return next((int(float(line[len(PURGED_METRIC):])) for line in text.splitlines()
                 if line.startswith(PURGED_METRIC)), 0)


async def purge(ctx: Context) -> Metrics:
    """The workload quiet, then beside a purge of STORED_RUNS ended runs: p99s, their ratio, the purge's time."""
    stored = STORED_RUNS if not ctx.quick else 2_000
    seconds = WORKLOAD_S if not ctx.quick else 1.0
    await put_step(ctx, {"name": "seq", "kind": "sequential", "children": [
        {"step": api_step(f"seq-{i}", f"{ctx.svc.url}/step")} for i in range(STORED_STEPS)]})
    warm = ctx.sizes.warmup_runs
    await asyncio.gather(*(start_run(ctx, "seq") for _ in range(warm)))
    await ctx.svc.wait(ctx.http, ctx.timeout(RUN_WAIT_S), accepted=warm * STORED_STEPS)

    t0 = time.monotonic()
    await load_ended_runs(ctx.database_url, stored, STORED_STEPS, datetime.now(UTC) - timedelta(days=1))
    loaded_s = time.monotonic() - t0
    log(f"purge: {stored} ended runs stored in {loaded_s:.1f} s")

    quiet = await _workload(ctx, "quiet", WORKLOAD_RATE, seconds)
    purging = asyncio.create_task(_purge(ctx, older_than_s=3_600))  # the stored runs, not the workload's
    await asyncio.sleep(PURGE_HEAD_START_S)  # a head start, not a wait for a condition: the purge is under way
    before = await _purged(ctx)
    busy = await _workload(ctx, "purging", WORKLOAD_RATE, seconds)
    during = await _purged(ctx) - before
    overlapped = not purging.done()  # the workload ran whole beside the purge
    deleted, purge_s = await purging
    ratio = {f"{what}_p99_ratio": round(busy[f"purging_{what}_p99_ms"] / quiet[f"quiet_{what}_p99_ms"], 3)
             for what in ("callback_answer", "transition") if quiet[f"quiet_{what}_p99_ms"]}
    return {"stored_runs": stored, "workload_runs_per_s": WORKLOAD_RATE, "workload_s": seconds,
            "batch_runs": BATCH_RUNS, "pause_ms": PAUSE_S * 1000, "busy_pause_ms": BUSY_PAUSE_S * 1000,
            "purged_during_workload": during,
            "load_s": round(loaded_s, 1), "purge_deleted": deleted, "purge_s": round(purge_s, 1),
            "purge_runs_per_s": round(deleted / purge_s, 1) if purge_s else 0.0, "overlapped": overlapped,
            **ratio, **quiet, **busy}
