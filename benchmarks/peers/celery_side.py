"""The Celery side of `benchmarks/run --peers`: AETR's chain, throughput and fan-out workloads on Celery + Redis.

It runs only in the peers' own virtual environment (benchmarks/peers/venv.py makes it; AETR never imports
Celery), as one process per case:

    .peers-venv/bin/python benchmarks/peers/celery_side.py --scenario chain --redis-url redis://127.0.0.1:6379/11

It flushes its Redis database, starts one Celery worker (`--pool solo` by default: one process that receives,
runs and acknowledges every task, as one `aetr serve` does), runs the workload, and prints one JSON object of
metrics on stdout. Every task records when its body started and ended, and the worker when it was done with
the task (result stored, next task of a chain sent: the `task_postrun` signal), in the worker's memory; a last
task hands the records back, so that timing costs the worker no Redis round trip.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import itertools
import json
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Final

import billiard
import kombu
import redis
from celery import Celery, chain, chord, current_task, group, signals
from celery import __version__ as celery_version
from celery.result import AsyncResult

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # benchmarks/, for its stdlib-only procstat
from procstat import children_of, cpu_seconds, machine_busy_seconds

HERE: Final = Path(__file__).resolve().parent
READY_TIMEOUT_S: Final = 60.0  # seconds the worker may take to run its first task
STOP_TIMEOUT_S: Final = 15.0  # seconds the worker gets to exit after SIGTERM before it is killed
RESULT_TIMEOUT_S: Final = 900.0  # seconds one awaited result may take
PR_SET_PDEATHSIG: Final = 1
REDIS_URL: Final = os.environ.get("AETR_PEERS_REDIS_URL", "redis://127.0.0.1:6379/11")
PREFETCH_MULTIPLIER: Final = int(os.environ.get("AETR_PEERS_PREFETCH", "4"))  # Celery's default
OWNER_KEY: Final = "aetr-peers:owner"  # the pid of the case using the Redis database now

app = Celery("aetr_peer", broker=REDIS_URL, backend=REDIS_URL)
app.conf.update(
    task_serializer="json", result_serializer="json", accept_content=["json"],
    # Acknowledge a task once it has run, as AETR records a step's end before it answers the callback:
    # a worker that dies mid-task leaves the task to be delivered again.
    task_acks_late=True,
    worker_prefetch_multiplier=PREFETCH_MULTIPLIER,
    worker_hijack_root_logger=False,
    broker_connection_retry_on_startup=True,
    result_expires=3600,
)

# (run, position, task id, body start ns, body end ns) of each task, and when the worker was done with it.
RECORDS: list[tuple[int, int, str, int, int]] = []
DONE_NS: dict[str, int] = {}


@app.task(name="noop")
def noop(run: int, position: int) -> dict[str, bool]:
    """The step: does nothing but note when it ran."""
    started = time.time_ns()
    RECORDS.append((run, position, current_task.request.id, started, time.time_ns()))
    return {"ok": True}


@app.task(name="gather")
def gather(outputs: list[Any]) -> int:
    """A chord's body: the fan-out's parent receiving its children's outputs, as AETR's array reducer does."""
    RECORDS.append((-1, len(outputs), current_task.request.id, time.time_ns(), time.time_ns()))
    return len(outputs)


@app.task(name="collect")
def collect() -> dict[str, Any]:
    """Hand the records over, and forget them."""
    out = {"records": list(RECORDS), "done": dict(DONE_NS)}
    RECORDS.clear()
    DONE_NS.clear()
    return out


@signals.task_postrun.connect
def _done(task_id: str | None = None, **_: Any) -> None:
    if task_id is not None:
        DONE_NS[task_id] = time.time_ns()


# ---- /proc ---------------------------------------------------------------------------------------------






def pids_named(name: str) -> list[int]:
    """The pids whose command name is `name`."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if (entry / "comm").read_text().strip() == name:
                    found.append(int(entry.name))
    return found




def peak_rss_mb(pid: int) -> float:
    """VmHWM of the process in MiB (0 when it is gone)."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


class Meter:
    """CPU seconds of the worker, Redis, this driver and everything else over a measured phase."""

    def __init__(self, worker_pid: int) -> None:
        self.worker = [worker_pid, *children_of(worker_pid)]
        self.redis = pids_named("redis-server")

    def _read(self) -> tuple[float, float, float, float]:
        own = os.times()
        return (sum(cpu_seconds(p) or 0.0 for p in self.worker), sum(cpu_seconds(p) or 0.0 for p in self.redis),
                own.user + own.system, machine_busy_seconds())

    @contextlib.contextmanager
    def measure(self, into: dict[str, Any]) -> Iterator[None]:
        before = self._read()
        started = time.perf_counter()
        yield
        wall = time.perf_counter() - started
        worker, redis_s, driver, busy = (a - b for a, b in zip(self._read(), before, strict=True))
        other = max(0.0, busy - worker - redis_s - driver)
        capacity = wall * (os.cpu_count() or 1)
        into.update({"celery": round(worker, 2), "redis": round(redis_s, 2), "driver": round(driver, 2),
                     "other": round(other, 2), "other_pct": round(100 * other / capacity, 1) if capacity else 0.0,
                     "machine_busy_pct": round(100 * busy / capacity, 1) if capacity else 0.0,
                     "loadavg_1m": float(Path("/proc/loadavg").read_text().split()[0])})


# ---- the worker ----------------------------------------------------------------------------------------


def _die_with_parent() -> None:
    """In the worker, before exec: get SIGTERM if this driver dies, so that no worker is left running."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class Worker:
    """One `celery worker` process on this module's app."""

    def __init__(self, pool: str, log_path: Path) -> None:
        self.args = [sys.executable, "-m", "celery", "-A", "celery_side", "worker", "--pool", pool,
                     "--concurrency", "1", "--loglevel", "WARNING", "--hostname", f"aetr-peer-{os.getpid()}@%h",
                     # one worker alone: nothing to synchronise with, and no events to send
                     "--without-gossip", "--without-mingle", "--without-heartbeat"]
        self.log_path = log_path
        self.popen: subprocess.Popen[bytes] | None = None

    def start(self) -> int:
        env = {**os.environ, "PYTHONPATH": str(HERE)}
        with self.log_path.open("ab") as out:
            self.popen = subprocess.Popen(self.args, cwd=HERE, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                          stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
        deadline = time.monotonic() + READY_TIMEOUT_S
        first = noop.si(-2, 0).apply_async()
        while not first.ready():
            if self.popen.poll() is not None:
                raise RuntimeError(f"the celery worker exited while starting: {self.tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the celery worker ran no task within {READY_TIMEOUT_S:g} s: {self.tail()}")
            time.sleep(0.05)
        return self.popen.pid

    def tail(self) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-20:])
        return "(no log)"

    def stop(self) -> None:
        if self.popen is None or self.popen.poll() is not None:
            return
        self.popen.terminate()
        try:
            self.popen.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()


def claim_database() -> None:
    """Flush the Redis database for this case alone; exit when another live case is using it."""
    client = redis.Redis.from_url(REDIS_URL)
    holder = client.get(OWNER_KEY)
    if holder is not None and int(holder) != os.getpid() and _alive(int(holder)):
        sys.exit(f"Redis database {REDIS_URL} is in use by another `benchmarks/run --peers` (process {int(holder)}): "
                 "wait for it to end, or pass another database number with --peers-redis-url")
    client.flushdb()
    client.set(OWNER_KEY, os.getpid())


def release_database() -> None:
    """Leave the database to the next case (when this one still holds it)."""
    client = redis.Redis.from_url(REDIS_URL)
    if client.get(OWNER_KEY) == str(os.getpid()).encode():
        client.delete(OWNER_KEY)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def wait(result: AsyncResult) -> Any:
    """The result of a task, once the worker has stored it.

    Without follow_parents=False, Celery's wait reads the state of every parent (a chain's earlier tasks, a
    chord's children) again at each message and interval: a Redis GET per parent, which kept this driver and
    Redis as busy as the worker in the chain, and this driver busy for minutes in the fan-out of 10,000.
    """
    return result.get(timeout=RESULT_TIMEOUT_S, follow_parents=False)


def records() -> tuple[list[tuple[int, int, str, int, int]], dict[str, int]]:
    """Everything the worker recorded since the last call."""
    got = wait(collect.si().apply_async())
    return [tuple(r) for r in got["records"]], got["done"]  # type: ignore[misc]  # JSON gives lists back


# ---- statistics ----------------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """The nearest-rank q-quantile, as AETR's benchmarks take it; NaN when empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[max(1, math.ceil(q * len(ordered))) - 1]


def ms(ns: float) -> float:
    return round(ns / 1e6, 3)


# ---- the workloads -------------------------------------------------------------------------------------


def run_chain(meter: Meter, steps: int, runs: int) -> dict[str, Any]:
    """Sequential chains of no-op tasks, one after another: the gap from one task's end to the next one's start."""
    wait(chain(*(noop.si(-1, i) for i in range(steps))).apply_async())  # warm-up
    records()
    cpu: dict[str, Any] = {}
    sent: list[int] = []
    with meter.measure(cpu):
        for run in range(runs):
            sent.append(time.time_ns())
            wait(chain(*(noop.si(run, i) for i in range(steps))).apply_async())
    recs, done = records()
    by_run: dict[int, list[tuple[int, int, str, int, int]]] = {}
    for rec in recs:
        by_run.setdefault(rec[0], []).append(rec)
    gaps, start_gaps, busy_ns, incomplete = [], [], 0, 0
    for run in range(runs):
        tasks = sorted(by_run.get(run, []), key=lambda r: r[1])
        if len(tasks) != steps:
            incomplete += 1
            continue
        for prev, nxt in itertools.pairwise(tasks):
            gaps.append(nxt[3] - prev[4])
            start_gaps.append(nxt[3] - prev[3])
        busy_ns += done.get(tasks[-1][2], tasks[-1][4]) - sent[run]
    return {
        "steps": steps, "runs": runs, "gaps": len(gaps),
        "p50_ms": ms(percentile(gaps, 0.5)), "p99_ms": ms(percentile(gaps, 0.99)),
        "max_ms": ms(max(gaps, default=float("nan"))),
        "start_gap_p50_ms": ms(percentile(start_gaps, 0.5)), "start_gap_p99_ms": ms(percentile(start_gaps, 0.99)),
        "steps_per_s": round(steps * runs / (busy_ns / 1e9), 1) if busy_ns else float("nan"),
        "first_call_p50_ms": ms(percentile([by_run[r][0][3] - sent[r] for r in range(runs) if by_run.get(r)], 0.5)),
        "runs_not_complete": incomplete, "cpu_s": cpu,
    }


def run_throughput(meter: Meter, runs: int, steps: int, warmup: int) -> dict[str, Any]:
    """`runs` chains of `steps` no-op tasks sent at once: runs and step transitions per second."""
    warm = [chain(*(noop.si(-1, i) for i in range(steps))).apply_async() for _ in range(warmup)]
    for result in warm:
        wait(result)
    records()
    cpu: dict[str, Any] = {}
    with meter.measure(cpu):
        t0 = time.time_ns()
        results = [chain(*(noop.si(run, i) for i in range(steps))).apply_async() for run in range(runs)]
        posted = time.time_ns()
        for result in results:
            wait(result)
        seen = time.time_ns()
    recs, done = records()
    ends = [done.get(r[2], r[4]) for r in recs if r[0] >= 0]
    seconds = (max(ends) - t0) / 1e9
    complete = len({r[0] for r in recs if r[0] >= 0 and r[1] == steps - 1})
    return {
        "runs": runs, "steps_per_run": steps, "runs_started": len(results), "runs_complete": complete,
        "seconds": round(seconds, 3), "start_phase_s": round((posted - t0) / 1e9, 3),
        "results_seen_s": round((seen - t0) / 1e9, 3),
        "runs_per_s": round(complete / seconds, 1), "transitions_per_s": round(len(ends) / seconds, 1),
        "cpu_s": cpu,
    }


def run_fanout(meter: Meter, n: int) -> dict[str, Any]:
    """A chord of `n` no-op tasks whose body receives their outputs: submit to the body's result."""
    cpu: dict[str, Any] = {}
    with meter.measure(cpu):
        t0 = time.time_ns()
        result = chord(group(noop.si(0, i) for i in range(n)))(gather.s())
        posted = time.time_ns()
        output = wait(result)
        seen = time.time_ns()
    recs, done = records()
    children = [r for r in recs if r[0] == 0]
    body = [r for r in recs if r[0] == -1]
    complete_ns = done.get(body[0][2], body[0][4]) if body else seen
    return {
        "children": n, "run_created_s": round((posted - t0) / 1e9, 3),
        "all_called_s": round((max(r[3] for r in children) - t0) / 1e9, 3),
        "root_complete_s": round((complete_ns - t0) / 1e9, 3), "result_seen_s": round((seen - t0) / 1e9, 3),
        "root_state": "complete" if output == n and len(children) == n else f"{len(children)} of {n} ran",
        "output_len": output, "peak_rss_mb": round(sum(peak_rss_mb(p) for p in meter.worker), 1), "cpu_s": cpu,
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", required=True, help="chain, throughput or fanout-N")
    parser.add_argument("--pool", choices=("solo", "prefork"), default="solo")
    parser.add_argument("--chain-steps", type=int, default=100)
    parser.add_argument("--chain-runs", type=int, default=20)
    parser.add_argument("--throughput-runs", type=int, default=500)
    parser.add_argument("--throughput-steps", type=int, default=3)
    parser.add_argument("--warmup-runs", type=int, default=10)
    parser.add_argument("--log", type=Path, default=Path(os.devnull), help="the worker's log")
    parser.add_argument("--out", type=Path, help="write the metrics here (default: stdout)")
    args = parser.parse_args(argv)
    claim_database()
    worker = Worker(args.pool, args.log)
    try:
        pid = worker.start()
        records()  # forget the first task
        meter = Meter(pid)
        workloads: dict[str, Callable[[], dict[str, Any]]] = {
            "chain": lambda: run_chain(meter, args.chain_steps, args.chain_runs),
            "throughput": lambda: run_throughput(meter, args.throughput_runs, args.throughput_steps,
                                                 args.warmup_runs),
        }
        if args.scenario.startswith("fanout-"):
            metrics = run_fanout(meter, int(args.scenario.removeprefix("fanout-")))
        else:
            metrics = workloads[args.scenario]()
    finally:
        worker.stop()
        release_database()
    server = redis.Redis.from_url(REDIS_URL).info("server")
    metrics["peer"] = {
        "celery": celery_version, "kombu": kombu.__version__, "billiard": billiard.__version__,
        "redis_py": redis.__version__, "redis_server": server.get("redis_version"), "pool": args.pool,
        "concurrency": 1, "prefetch_multiplier": PREFETCH_MULTIPLIER, "acks_late": True,
        "broker": REDIS_URL, "result_backend": REDIS_URL,
    }
    if args.out is None:
        print(json.dumps(metrics), flush=True)
    else:
        args.out.write_text(json.dumps(metrics))


if __name__ == "__main__":
    main()
