"""The engine alone: the coordinator and the store, without HTTP, for comparing code with code.

Each round starts `--runs` runs of a 3-step sequence together, then reports each step's success for all of
them, three times, as the callbacks would; the calls the commits start are kept in memory, not made. It
prints one JSON line per round: CPU milliseconds per start and per event.

CPU milliseconds move with this VM's speed. For a number that does not, count instructions: run it with two
numbers of rounds under `perf stat` and divide the difference by the extra runs (6 extra rounds × 500 runs):

    perf stat -e instructions -x, .venv/bin/python -m benchmarks.engine_only --db sqlite --rounds 2
    perf stat -e instructions -x, .venv/bin/python -m benchmarks.engine_only --db sqlite --rounds 8

That is how docs/performance.md's "instructions per run" were measured. Where perf cannot count (it prints
`<not supported>`), callgrind can, about 50 times slower; it counts user-space instructions only, so its
numbers compare with each other, not with perf's:

    PYTHONHASHSEED=0 valgrind --tool=callgrind --callgrind-out-file=/dev/null .venv/bin/python \\
        -m benchmarks.engine_only --db sqlite --runs 200 --rounds 1   # then --rounds 3

(the difference divided by 2 × 200 runs).

`--statements` (SQLite only) also times each statement where the writer hands it to sqlite3, and prints with each
round the microseconds a run's statements took, by statement: the database's own share of the engine's work.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import uvloop

from aetr.api.server import settle_heap
from aetr.store import open_store
from aetr.store import sqlite as sqlite_store
from aetr.store.migrate import upgrade_engine
from aetr.testing.engine import coordinator_without_http
from benchmarks.databases import DEFAULT_POSTGRES_URL, fresh_database

STEPS = 3


class StatementClock:
    """Times every statement the SQLite writer runs (its `_execute`), by the statement's first words."""

    def __init__(self) -> None:
        self.ns: collections.Counter[str] = collections.Counter()

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        execute = sqlite_store._execute

        def timed(cur: Any, op: Any) -> Any:
            began = time.perf_counter_ns()
            try:
                return execute(cur, op)
            finally:
                self.ns[" ".join(op.sql.text.split())[:60]] += time.perf_counter_ns() - began

        sqlite_store._execute = timed
        try:
            yield
        finally:
            sqlite_store._execute = execute

    def per_run(self, runs: int) -> dict[str, float]:
        """Microseconds per run by statement, largest first, then clear."""
        out = {text: round(ns / runs / 1000, 1) for text, ns in self.ns.most_common()}
        self.ns.clear()
        return out


async def measure(url: str, runs: int, rounds: int, clock: StatementClock | None = None) -> None:
    store = open_store(url)
    await upgrade_engine(store.engine)
    coordinator, kept = await coordinator_without_http(store, "seq", STEPS)
    settle_heap()  # the cycle collector tuned as `aetr serve` tunes it once started
    try:
        for n in range(rounds):
            t0 = time.process_time()
            await asyncio.gather(*(coordinator.start_run("seq", {"n": i, "round": n}, None) for i in range(runs)))
            t1 = time.process_time()
            events = 0
            for _ in range(STEPS):
                events += await kept.succeed(coordinator, {"out": n, "v": [1, 2, 3]})
            t2 = time.process_time()
            line: dict[str, Any] = {"round": n, "db": store.dialect, "runs": runs,
                                    "start_cpu_ms": round((t1 - t0) / runs * 1000, 3),
                                    "event_cpu_ms": round((t2 - t1) / max(events, 1) * 1000, 3)}
            if clock is not None:
                statements = clock.per_run(runs)
                line["statements_us_per_run"] = round(sum(statements.values()), 1)
                line["by_statement_us_per_run"] = statements
            print(orjson.dumps(line).decode(), flush=True)
    finally:
        await store.close()


async def main(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="aetr-engine-only-") as workdir:
        async with fresh_database(args.db, Path(workdir), "engine-only", args.postgres_url) as url:
            if args.statements:
                clock = StatementClock()
                with clock.installed():
                    await measure(url, args.runs, args.rounds, clock)
            else:
                await measure(url, args.runs, args.rounds)


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--db", choices=("sqlite", "postgres"), default="sqlite")
    parser.add_argument("--runs", type=int, default=500, help="runs started together in each round")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--statements", action="store_true",
                        help="SQLite: also time each statement; each round prints microseconds per run by statement")
    parser.add_argument("--postgres-url", default=os.environ.get("AETR_BENCH_POSTGRES_URL", DEFAULT_POSTGRES_URL))
    args = parser.parse_args()
    if args.statements and args.db != "sqlite":
        parser.error("--statements times SQLite's statements: use it with --db sqlite")
    return args


if __name__ == "__main__":
    uvloop.run(main(parse()))
