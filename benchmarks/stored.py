"""The stored scenario: does AETR slow down as the database fills with ended runs?

The chain and throughput scenarios and the run listings are measured on the fresh database, then again after
1,000,000 ended 3-step runs are stored in bulk (benchmarks.bulk: the rows real runs leave, nodes and history),
on the same server. Reported: each figure before and after, their ratios, and the bytes each stored run takes.
"""

from __future__ import annotations

import math
import statistics
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final

import asyncpg

from benchmarks.bulk import load_ended_runs
from benchmarks.common import Context, log
from benchmarks.scenarios import _time_get, chain, throughput

STORED_RUNS: Final = 1_000_000
STORED_STEPS: Final = 3
LIST_SAMPLES: Final = 15
Metrics = dict[str, Any]

# The listings timed: the first page, a state no stored run is in, the stored runs' step, and the 10th page of
# that step and of a state every stored run is in, each reached by following the cursor.
LISTINGS: Final = {"list_first": "/runs", "list_state_error": "/runs?state=error", "list_step": "/runs?step=bulk"}
PAGED: Final = {"list_step_page10": "/runs?step=bulk", "list_state_page10": "/runs?state=complete"}


def _file_bytes(path: str) -> int:
    """The SQLite database's bytes on disk: the file and its write-ahead log."""
    return sum(Path(p).stat().st_size for p in (path, f"{path}-wal") if Path(p).exists())


async def _database_bytes(ctx: Context) -> int:
    if ctx.database_url.startswith("sqlite"):
        return _file_bytes(ctx.database_url.split("///", 1)[1])
    conn = await asyncpg.connect(ctx.database_url.replace("postgresql+asyncpg://", "postgresql://"))
    try:
        return int(await conn.fetchval("SELECT pg_database_size(current_database())"))
    finally:
        await conn.close()


async def _page10(ctx: Context, path: str) -> str:
    """`path` with the cursor of its 10th page."""
    cursor = None
    for _ in range(9):
        joiner = "&" if "?" in path else "?"
        async with ctx.http.get(f"{ctx.api}{path}" + (f"{joiner}cursor={cursor}" if cursor else "")) as resp:
            body = await resp.json()
        cursor = body.get("next_cursor")
        if cursor is None:
            return path  # fewer than 10 pages (--quick): time the first
    return f"{path}{'&' if '?' in path else '?'}cursor={cursor}"


async def _listings(ctx: Context, phase: str) -> Metrics:
    out: Metrics = {}
    paths = {**LISTINGS, **{name: await _page10(ctx, path) for name, path in PAGED.items()}}
    for name, path in paths.items():
        timings, _size = await _time_get(ctx, path, LIST_SAMPLES)
        out[f"{phase}_{name}_ms"] = round(statistics.median(timings), 2)
    return out


async def _measure(ctx: Context, phase: str) -> Metrics:
    ch = await chain(ctx)
    tp = await throughput(ctx)
    return {f"{phase}_chain_p50_ms": ch["p50_ms"], f"{phase}_chain_p99_ms": ch["p99_ms"],
            f"{phase}_transitions_per_s": tp["transitions_per_s"],
            f"{phase}_callback_answer_p99_ms": tp["callback_answer_p99_ms"], **await _listings(ctx, phase)}


def _ratio(after: Any, before: Any) -> float:
    return round(after / before, 3) if before and not math.isnan(before) else math.nan


async def stored(ctx: Context) -> Metrics:
    """Chain, throughput and listings on an empty database and on one holding STORED_RUNS ended runs."""
    runs = STORED_RUNS if not ctx.quick else 5_000
    empty = await _measure(ctx, "empty")
    size_before = await _database_bytes(ctx)
    t0 = time.monotonic()
    await load_ended_runs(ctx.database_url, runs, STORED_STEPS, datetime.now(UTC) - timedelta(days=1))
    loaded_s = time.monotonic() - t0
    stored_bytes = await _database_bytes(ctx) - size_before
    log(f"stored: {runs} ended runs stored in {loaded_s:.1f} s, {stored_bytes / runs:.0f} bytes each")
    full = await _measure(ctx, "stored")
    ratios = {"chain_p50_ratio": _ratio(full["stored_chain_p50_ms"], empty["empty_chain_p50_ms"]),
              "chain_p99_ratio": _ratio(full["stored_chain_p99_ms"], empty["empty_chain_p99_ms"]),
              "throughput_ratio": _ratio(full["stored_transitions_per_s"], empty["empty_transitions_per_s"]),
              "page10_to_first": _ratio(full["stored_list_step_page10_ms"], full["stored_list_step_ms"])}
    slowest_filtered = max(full["stored_list_state_error_ms"], full["stored_list_step_ms"],
                           full["stored_list_state_page10_ms"], full["stored_list_step_page10_ms"])
    return {"stored_runs": runs, "steps_per_run": STORED_STEPS, "load_s": round(loaded_s, 1),
            "bytes_per_run": round(stored_bytes / runs), "list_first_ms": full["stored_list_first_ms"],
            "list_filtered_max_ms": slowest_filtered, **ratios, **empty, **full}
