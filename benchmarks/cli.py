"""The one benchmark command: every scenario on SQLite and PostgreSQL, one JSON line each on stdout."""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Final

import aiohttp
import orjson

from benchmarks import slower
from benchmarks.common import Context, Sizes, calibration_ms
from benchmarks.databases import DEFAULT_POSTGRES_URL, check_postgres, fresh_database
from benchmarks.peers.celery_case import DEFAULT_REDIS_URL, check_redis, run_celery_case
from benchmarks.peers.celery_case import SCENARIOS as PEER_SCENARIOS
from benchmarks.peers.summary import render, summarise, summary_line
from benchmarks.peers.venv import PeerSetupError, ensure_venv
from benchmarks.processes import PROFILE_FLAGS, REPO, AetrServer, StepServiceProcess, log
from benchmarks.procstat import machine_busy_seconds
from benchmarks.scenarios import Case, Metrics, cases
from benchmarks.stepsvc import CALLBACK_POOL_SIZE

SCENARIOS: Final = ("chain", "throughput", "fanout", "load", "sandbox", "map", "map-large", "concurrency")
STANDIN_SCENARIOS: Final = ("chain", "throughput")  # what benchmarks/standin.py answers
# What `aetr serve` runs with: the defaults, written out so that a change of default does not move the numbers.
SERVER_SETTINGS: Final = {"AETR_POLL_S": "1.0", "AETR_LEASE_S": "60", "AETR_MAX_IN_FLIGHT": "256"}
# Keys kept out of the median: they describe the setup, or are lists and maps.
NOT_AVERAGED: Final = {"steps", "runs", "children", "run_nodes", "tree_nodes", "gets", "calls", "input_bytes",
                       "steps_per_run", "gaps", "contended_retries", "workers",
                       "items", "small_items", "limit"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Start the real `aetr serve` and a step service on 127.0.0.1, run each scenario on a fresh "
                    "database, and print one JSON line per scenario and database on stdout (logs go to stderr).")
    parser.add_argument("--db", choices=("sqlite", "postgres", "both"), default="both")
    parser.add_argument("--scenario", action="append", metavar="NAME",
                        help=f"run only these ({', '.join(SCENARIOS)}, or one fan-out size such as fanout-1000); "
                             "repeat the option for several; `stored` (1,000,000 ended runs stored, then the chain, "
                             "throughput and listings again) and `purge` (100,000 stored runs deleted beside the "
                             "throughput workload) runs only when named")
    parser.add_argument("--quick", action="store_true",
                        help="small sizes: a smoke test that finishes in under a minute (targets are not judged)")
    parser.add_argument("--workers", type=int, default=1,
                        help="AETR_WORKERS of the server: processes serving the port (default 1)")
    parser.add_argument("--callers", type=int, default=CALLBACK_POOL_SIZE, metavar="N",
                        help=f"callbacks the step service sends at once (default {CALLBACK_POOL_SIZE}); each "
                             "finished step beyond that waits for one of them to be answered, as with a service "
                             "of N workers")
    parser.add_argument("--set", action="append", default=[], metavar="AETR_NAME=VALUE", dest="settings",
                        help="a setting of the server under test (repeatable), e.g. AETR_SQLITE_SYNCHRONOUS=normal")
    parser.add_argument("--standin", action="store_true",
                        help="measure the floor: benchmarks/standin.py (in memory, no database) in aetr's place; "
                             "chain and throughput only")
    parser.add_argument("--peers", action="store_true",
                        help="also run each case on the stand-in (chain, throughput) and on Celery 5 + Redis (in a "
                             "venv of its own, made on first use), interleaved, and print AETR's ratios to them; "
                             "chain, throughput and fanout only")
    parser.add_argument("--peers-redis-url", default=os.environ.get("AETR_BENCH_REDIS_URL", DEFAULT_REDIS_URL),
                        help="Redis for Celery's broker and results: a database number of its own, flushed before "
                             "each case (env AETR_BENCH_REDIS_URL)")
    parser.add_argument("--peers-pool", choices=("solo", "prefork"), default="solo",
                        help="the Celery worker's pool: solo (default; one process, as one aetr serve) or prefork "
                             "(a parent and one child process)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="run each case N times, each on a fresh database and server; report medians")
    parser.add_argument("--postgres-url", default=os.environ.get("AETR_BENCH_POSTGRES_URL", DEFAULT_POSTGRES_URL),
                        help="an administrative PostgreSQL URL; each case creates and drops its own database "
                             "(env AETR_BENCH_POSTGRES_URL)")
    parser.add_argument("--profile", type=Path, metavar="DIR",
                        help="record the aetr process with py-spy during each measured phase, into DIR")
    parser.add_argument("--profile-format", choices=("raw", "flamegraph", "speedscope"), default="raw",
                        help="py-spy output format (raw: collapsed stacks, read by benchmarks/profile_top.py)")
    parser.add_argument("--profile-flags", default=PROFILE_FLAGS,
                        help=f"other py-spy record options (default {PROFILE_FLAGS!r}; e.g. add --gil or --native)")
    parser.add_argument("--wait-quiet", type=float, metavar="PCT",
                        help="for a shared machine: before each case, wait (up to 15 min) until the machine is less "
                             "than PCT%% busy, and run a case again (twice at most) when other work took more than "
                             "PCT%% of the machine while it was measured")
    parser.add_argument("--slower", type=float, metavar="FACTOR",
                        help="run as a machine FACTOR times slower would: every measured process capped at "
                             "1/FACTOR of a core by a CPU cgroup (needs root; see benchmarks/slower.py)")
    parser.add_argument("--timeout-factor", type=float, default=1.0, help="scale every deadline by this factor")
    parser.add_argument("--workdir", type=Path, help="where logs and SQLite files go (default: a new temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (server logs) afterwards")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target is missed, not only on errors")
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    return args


def source_version() -> str:
    """The commit the benchmarked code is at, plus a fingerprint of uncommitted changes under src/ (read-only git)."""
    def git(*args: str) -> bytes:
        try:
            return subprocess.run(["git", *args], cwd=REPO, capture_output=True, timeout=30, check=True).stdout
        except (OSError, subprocess.SubprocessError):
            return b""

    commit = git("rev-parse", "--short", "HEAD").decode().strip() or "unknown"
    diff = git("diff", "HEAD", "--", "src") + git("ls-files", "--others", "--exclude-standard", "--", "src")
    return f"{commit}+{hashlib.sha1(diff).hexdigest()[:8]}" if diff.strip() else commit


def judge(case: Case, db: str, metrics: Metrics, quick: bool) -> Metrics:
    """The result line: scenario, db, metrics, the targets, and whether they are met."""
    bounds = case.targets(db)
    line: Metrics = {"scenario": case.scenario, "db": db, **metrics}
    line["target"] = {b.key: b.value for b in bounds}
    if "error" in metrics:
        line["met"] = False
    elif quick:
        line["met"] = None  # not the reference sizes: the targets do not apply
    else:
        line["met"] = all(b.met(metrics) for b in bounds)
        missed = [b.key for b in bounds if not b.met(metrics)]
        if missed:
            line["missed"] = missed
    return line


def merge(results: list[Metrics]) -> Metrics:
    """Several repeats of one case as one: the median of each number, and the numbers themselves."""
    if len(results) == 1:
        return results[0]
    ok = [r for r in results if "error" not in r]
    if not ok:
        return results[-1]
    merged: Metrics = dict(ok[0])
    samples: dict[str, list[float]] = {}
    for key, value in ok[0].items():
        if key in NOT_AVERAGED or isinstance(value, bool) or not isinstance(value, int | float):
            continue
        values = [r[key] for r in ok if isinstance(r.get(key), int | float)]
        finite = [v for v in values if not math.isnan(v)]
        if finite:
            merged[key] = round(statistics.median(finite), 3)
            samples[key] = values
    merged["repeats"] = len(ok)
    versions = sorted({str(r.get("aetr_version")) for r in ok})
    if len(versions) > 1:  # the code changed between repeats: the median mixes versions
        merged["aetr_version"] = versions
    merged["samples"] = samples
    if len(ok) < len(results):
        merged["failed_repeats"] = [r["error"] for r in results if "error" in r]
    return merged


QUIET_SAMPLE_S: Final = 3.0  # seconds over which the machine's busy share is measured
QUIET_MAX_WAIT_S: Final = 900.0  # seconds --wait-quiet waits at most before running anyway
CONTENDED_RETRIES: Final = 2  # times --wait-quiet runs a case again when other work disturbed its measurement


async def wait_quiet(threshold_pct: float) -> float:
    """Wait until the machine is less than `threshold_pct` busy (or QUIET_MAX_WAIT_S passed); seconds waited."""
    started = time.monotonic()
    cores = os.cpu_count() or 1
    while True:
        before = machine_busy_seconds()
        await asyncio.sleep(QUIET_SAMPLE_S)
        busy_pct = 100 * (machine_busy_seconds() - before) / (QUIET_SAMPLE_S * cores)
        waited = time.monotonic() - started
        if busy_pct < threshold_pct:
            return round(waited, 1)
        if waited > QUIET_MAX_WAIT_S:
            log(f"the machine is still {busy_pct:.0f}% busy after {waited:.0f} s: running anyway")
            return round(waited, 1)
        log(f"machine {busy_pct:.0f}% busy (other work): waiting for it to drop under {threshold_pct:g}%")


async def run_case(case: Case, db: str, args: argparse.Namespace, sizes: Sizes, workdir: Path,
                   http: aiohttp.ClientSession, standin: bool) -> Metrics:
    """One case on a fresh database, a fresh server and a fresh step service; its metrics (or its error)."""
    async with fresh_database(db, workdir, case.label, args.postgres_url) as url:
        tag = f"{case.label}-{db}-{time.strftime('%H%M%S')}"
        settings = {**SERVER_SETTINGS, "AETR_WORKERS": str(args.workers),
                    **dict(kv.split("=", 1) for kv in args.settings)}
        server = AetrServer(url, workdir / f"{tag}-aetr.log", settings, standin=standin)
        svc = StepServiceProcess(workdir / f"{tag}-stepsvc.log", args.callers)
        ctx = Context(db=db, database_url=url, server=server, svc=svc, http=http, sizes=sizes, quick=args.quick,
                      timeout_factor=args.timeout_factor, label=case.label, profile_dir=args.profile,
                      profile_format=args.profile_format, profile_flags=tuple(args.profile_flags.split())
                      + (("--subprocesses",) if args.workers > 1 else ()))
        waited = await wait_quiet(args.wait_quiet) if args.wait_quiet else None
        version = source_version()  # what the server about to start imports
        speed = calibration_ms()
        started = time.monotonic()
        try:
            await asyncio.gather(svc.start_ready(), server.start_ready(http))
            metrics = await asyncio.wait_for(case.run(ctx), case.deadline_s * args.timeout_factor)
        except Exception as exc:  # one failed case must not stop the others: it is reported in its line
            log(f"{case.label} on {db} failed: {type(exc).__name__}: {exc}")
            traceback.print_exc(file=sys.stderr)
            if server.popen is not None:
                log(f"aetr log tail ({server.log_path}):\n{server.tail()}")
            metrics = {"error": f"{type(exc).__name__}: {exc}"[:500]}
        finally:
            stopping = time.monotonic()
            await asyncio.gather(server.stop(), svc.stop())
            log(f"{case.label} on {db}: processes stopped in {time.monotonic() - stopping:.1f} s")
        metrics["wall_s"] = round(time.monotonic() - started, 1)
        metrics["aetr_version"] = version
        metrics["calibration_ms"] = speed
        metrics["workers"] = args.workers
        if args.slower is not None:
            metrics["slower"] = args.slower  # its calibration_ms is the slowed one
        metrics["callers"] = args.callers
        if waited is not None:
            metrics["waited_for_quiet_s"] = waited
        if ctx.profiled:
            metrics["profiled"] = True
        metrics["other_load_pct"] = ctx.other_load_pct
        return metrics


async def run_repeat(case: Case, db: str, args: argparse.Namespace, sizes: Sizes, workdir: Path,
                     http: aiohttp.ClientSession, standin: bool) -> Metrics:
    """One repeat of a case; with --wait-quiet, run again (a bounded number of times) when other work took
    more than the threshold of the machine while it was measured."""
    for attempt in range(1 + CONTENDED_RETRIES):
        metrics = await run_case(case, db, args, sizes, workdir, http, standin)
        if not args.wait_quiet or "error" in metrics or metrics["other_load_pct"] <= args.wait_quiet:
            break
        if attempt < CONTENDED_RETRIES:
            log(f"{case.label} on {db}: other work took {metrics['other_load_pct']:g}% of the machine while it "
                f"was measured (over {args.wait_quiet:g}%): running it again")
    metrics["contended_retries"] = attempt
    return metrics


def emit(line: Metrics, quick: bool) -> Metrics:
    """Print a result line on stdout (as soon as it is known: a long run shows its progress)."""
    if quick:
        line["quick"] = True
    print(orjson.dumps(line).decode(), flush=True)
    return line


async def run_each(args: argparse.Namespace, selected: list[Case], dbs: list[str], sizes: Sizes, workdir: Path,
                   http: aiohttp.ClientSession) -> list[Metrics]:
    """Each case on each database, its repeats one after another; the lines printed."""
    lines = []
    for db in dbs:
        for case in selected:
            results = []
            for i in range(args.repeat):
                log(f"{case.label} on {db} ({i + 1}/{args.repeat})")
                results.append(await run_repeat(case, db, args, sizes, workdir, http, args.standin))
            line = judge(case, db, merge(results), args.quick)
            if args.standin:
                line["db"] = "none (standin)"
            lines.append(emit(line, args.quick))
    return lines


PEER_DB: Final = {"standin": "none (standin)", "celery": "redis (celery)"}  # the `db` of a peer's line


async def run_peers(args: argparse.Namespace, selected: list[Case], dbs: list[str], sizes: Sizes, workdir: Path,
                    http: aiohttp.ClientSession, peers_python: Path) -> list[Metrics]:
    """Each case on the stand-in (chain and throughput), on Celery and on AETR with each database, interleaved:
    each repeat runs every system once, in an order that turns by one from a repeat to the next, so that the
    machine's drift hits them all. The lines printed, then the summary (a table on stderr, a line on stdout)."""
    def systems(case: Case) -> list[tuple[str, str]]:
        standin = [("standin", "sqlite")] if case.scenario in STANDIN_SCENARIOS else []
        return [*standin, ("celery", "redis"), *(("aetr", db) for db in dbs)]

    results: dict[tuple[str, str, str], list[Metrics]] = {}
    for i in range(args.repeat):
        for case in selected:
            order = systems(case)
            turn = i % len(order)
            for system, db in order[turn:] + order[:turn]:
                log(f"{case.label} on {db if system == 'aetr' else system} ({i + 1}/{args.repeat})")
                if system == "celery":
                    if args.wait_quiet:
                        await wait_quiet(args.wait_quiet)
                    metrics = await run_celery_case(case.label, peers_python, sizes, workdir, args.peers_redis_url,
                                                    args.peers_pool, case.deadline_s * args.timeout_factor)
                else:
                    metrics = await run_repeat(case, db, args, sizes, workdir, http, standin=system == "standin")
                results.setdefault((case.label, system, db), []).append(metrics)
    lines = []
    for case in selected:
        for system, db in systems(case):
            merged = merge(results[(case.label, system, db)])
            if system == "aetr":
                line = judge(case, db, merged, args.quick)
            else:
                line = {"scenario": case.scenario, "db": PEER_DB[system], **merged, "target": {}, "met": None}
            lines.append(emit({**line, "case": case.label, "system": system}, args.quick))
    rows = summarise(lines)
    print(render(rows, lines), file=sys.stderr, flush=True)
    print(orjson.dumps(summary_line(rows, lines)).decode(), flush=True)
    return lines


async def main_async(args: argparse.Namespace) -> int:
    """Run the selected cases; the exit code."""
    sizes = Sizes.quick() if args.quick else Sizes()
    chosen = set(args.scenario or (PEER_SCENARIOS if args.peers else SCENARIOS))
    every = cases(sizes.fanout)
    unknown = chosen - {c.scenario for c in every} - {c.label for c in every}
    if unknown:
        log(f"unknown scenario {', '.join(sorted(unknown))}: choose from "
            f"{', '.join(SCENARIOS)} or {', '.join(c.label for c in every if c.label != c.scenario)}")
        return 2
    selected = [c for c in every if c.scenario in chosen or c.label in chosen]
    dbs = ["sqlite", "postgres"] if args.db == "both" else [args.db]
    if args.peers:
        if args.standin:
            log("--peers runs the stand-in itself: leave out --standin")
            return 2
        if any(c.scenario not in PEER_SCENARIOS for c in selected):
            log(f"--peers compares the {', '.join(PEER_SCENARIOS)} scenarios only: pick them with --scenario")
            return 2
        if why := await check_redis(args.peers_redis_url):
            log(f"Redis at {args.peers_redis_url} does not answer ({why}): start it (redis-server), pass "
                "--peers-redis-url, or leave out --peers")
            return 2
    if args.standin:
        if any(c.scenario not in STANDIN_SCENARIOS for c in selected):
            log("--standin answers the chain and throughput scenarios only: pick them with --scenario")
            return 2
        dbs = ["sqlite"]  # it keeps nothing: one (unused) database
    if "postgres" in dbs and (why := await check_postgres(args.postgres_url)):
        log(f"PostgreSQL at {args.postgres_url} does not answer ({why}): start it, or pass --db sqlite")
        return 2
    try:
        peers_python = await ensure_venv() if args.peers else None
    except PeerSetupError as exc:
        log(str(exc))
        return 2
    if args.slower is not None:
        try:
            slowdown = slower.start(args.slower)
        except (slower.SlowdownError, OSError) as exc:
            log(str(exc))
            return 2
        placed = {command: slower.place_service(command)
                  for command in ("postgres", *(("redis-server",) if args.peers else ()))}
        log(f"as a machine {args.slower:g} times slower: each process at most 1/{args.slower:g} of a core, all "
            f"together at most {slowdown.cores}/{args.slower:g} cores (cgroup v{slowdown.version}); services capped "
            "together: "
            + ", ".join(f"{command} ({n} processes)" for command, n in placed.items()))
    try:
        return await _run_all(args, selected, dbs, sizes, peers_python)
    finally:
        slower.stop()


async def _run_all(args: argparse.Namespace, selected: list[Case], dbs: list[str], sizes: Sizes,
                   peers_python: Path | None) -> int:
    """The selected cases on each database (and the peers), in a work directory; the exit code."""
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="aetr-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    log(f"work directory {workdir}; {'quick' if args.quick else 'full'} sizes; "
        f"{len(selected)} case(s) x {len(dbs)} database(s) x {args.repeat}")
    failures = misses = 0
    log(f"benchmarking aetr at {source_version()}")
    connector = aiohttp.TCPConnector(limit=100)
    try:
        async with aiohttp.ClientSession(connector=connector) as http:
            if peers_python is not None:
                lines = await run_peers(args, selected, dbs, sizes, workdir, http, peers_python)
            else:
                lines = await run_each(args, selected, dbs, sizes, workdir, http)
        failures = sum("error" in line for line in lines)
        misses = sum(line["met"] is False for line in lines)
    finally:
        if args.keep or failures:
            log(f"logs kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    if failures:
        return 1
    return 1 if args.strict and misses else 0


async def main_cancellable(args: argparse.Namespace) -> int:
    """main_async, cancelled by SIGTERM as by Ctrl-C, so that servers stop and databases are dropped."""
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    try:
        return await main_async(args)
    except asyncio.CancelledError:
        log("stopped by a signal; processes and databases cleaned up")
        return 130


def main(argv: list[str] | None = None) -> None:
    """Entry point of `python -m benchmarks`."""
    args = parse_args(argv)
    try:
        import uvloop
    except ImportError:  # plain asyncio works too
        sys.exit(asyncio.run(main_cancellable(args)))
    sys.exit(uvloop.run(main_cancellable(args)))
