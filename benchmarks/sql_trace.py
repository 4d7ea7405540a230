"""Count the SQL a step costs: statements and transactions per callback, per claim, per dispatch.

Run with `.venv/bin/python -m benchmarks.sql_trace [--db sqlite|postgres] [--steps N] [--runs N]`. It serves the
real application in this process (the `create_app` and `Engine` that `aetr serve` runs) on 127.0.0.1 with a
step service in its own process, attaches SQLAlchemy event listeners from outside, runs sequential chains,
and prints what each kind of task sent per step: the callback request, the worker's claim loop, and the
dispatch task. Times are per statement, from the cursor call to its return, as seen by this process.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Final

import aiohttp
import uvicorn
from sqlalchemy import event

from aetr.api.app import create_app
from aetr.config import Settings
from aetr.engine.runtime import Engine
from benchmarks.common import Context, Sizes, api_step, put_step, start_run
from benchmarks.databases import DEFAULT_POSTGRES_URL, fresh_database
from benchmarks.processes import AetrServer, StepServiceProcess, free_port, log

READY_TIMEOUT_S: Final = 30.0  # seconds for the in-process server to start
TASKS: Final = {  # coroutine qualname of the asyncio task → what it does for a step
    "RequestResponseCycle.run_asgi": "callback request",
    "Worker._run": "worker claim loop",
    "Worker._perform": "dispatch task",
}


class Tracer:
    """Counts statements and transaction ends per kind of task, with their time in this process."""

    def __init__(self) -> None:
        self.statements: Counter[tuple[str, str]] = Counter()
        self.seconds: defaultdict[tuple[str, str], float] = defaultdict(float)
        self.wire: Counter[tuple[str, str]] = Counter()
        self.active = False
        self._started: dict[int, float] = {}

    def watch_driver(self) -> None:
        """Count the driver calls that each cost a round trip (PostgreSQL) or a thread hop (SQLite).

        This patches the drivers in this process only: the tracer's own copy of the application.
        """
        import aiosqlite.core
        import asyncpg.connection
        import asyncpg.prepared_stmt

        self._wrap(aiosqlite.core.Connection, "_execute", "aiosqlite call (a hop to its thread and back)")
        self._wrap(asyncpg.connection.Connection, "execute", "asyncpg simple query (BEGIN/COMMIT/ROLLBACK)")
        self._wrap(asyncpg.connection.Connection, "prepare", "asyncpg PREPARE (statement cache miss)")
        self._wrap(asyncpg.connection.Connection, "executemany", "asyncpg executemany")
        self._wrap(asyncpg.prepared_stmt.PreparedStatement, "fetch", "asyncpg bind + execute")

    def _wrap(self, owner: Any, name: str, label: str) -> None:
        original = getattr(owner, name)
        tracer = self

        async def counted(*args: Any, **kwargs: Any) -> Any:
            if tracer.active:
                tracer.wire[(task_kind(), label)] += 1
            return await original(*args, **kwargs)

        setattr(owner, name, counted)

    def attach(self, sync_engine: Any) -> None:
        """Listen to every statement, commit and rollback of `sync_engine`."""
        event.listen(sync_engine, "before_cursor_execute", self._before)
        event.listen(sync_engine, "after_cursor_execute", self._after)
        event.listen(sync_engine, "commit", lambda conn: self._count("COMMIT"))
        event.listen(sync_engine, "rollback", lambda conn: self._count("ROLLBACK"))
        event.listen(sync_engine.pool, "reset", lambda *a: self._count("pool reset (ROLLBACK)"))

    def _count(self, what: str) -> None:
        if self.active:
            self.statements[(task_kind(), what)] += 1

    def _before(self, conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        self._started[id(cursor)] = time.perf_counter()

    def _after(self, conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        started = self._started.pop(id(cursor), None)
        if not self.active or started is None:
            return
        key = (task_kind(), summarise(statement))
        self.statements[key] += 1
        self.seconds[key] += time.perf_counter() - started


def task_kind() -> str:
    """Which kind of task is running now (see TASKS)."""
    try:
        task = asyncio.current_task()
    except RuntimeError:
        return "(no task)"
    if task is None:
        return "(no task)"
    name = getattr(task.get_coro(), "__qualname__", "?")
    return TASKS.get(name, name)


def summarise(statement: str) -> str:
    """A statement's verb and table, e.g. `UPDATE run_nodes`, `WITH RECURSIVE chain`."""
    words = statement.split()
    if not words:
        return "?"
    verb = words[0].upper()
    if verb in ("BEGIN", "PRAGMA", "COMMIT", "ROLLBACK"):
        return " ".join(words[:2])
    if verb == "WITH":
        return " ".join(words[:3])
    upper = [w.upper() for w in words]
    for keyword in ("FROM", "INTO", "UPDATE"):
        if keyword in upper[:-1]:
            table = words[upper.index(keyword) + 1]
            return f"{verb} {table}"
    return verb


async def run(db: str, steps: int, runs: int, postgres_url: str) -> None:
    """Serve the app in-process, run chains, print the statements per step."""
    workdir = Path(tempfile.mkdtemp(prefix="aetr-sqltrace-"))
    svc = StepServiceProcess(workdir / "stepsvc.log")
    await svc.start_ready()
    try:
        async with fresh_database(db, workdir, "sqltrace", postgres_url) as url, aiohttp.ClientSession() as http:
            port = free_port()
            settings = Settings(database_url=url, port=port)
            engine = Engine(settings)
            tracer = Tracer()
            tracer.attach(engine.store.engine.sync_engine)
            tracer.watch_driver()
            config = uvicorn.Config(create_app(settings, engine=engine), host="127.0.0.1", port=port,
                                    log_level="warning", access_log=False)
            server = uvicorn.Server(config)
            serving = asyncio.create_task(server.serve())
            try:
                for _ in range(int(READY_TIMEOUT_S / 0.05)):
                    if server.started:
                        break
                    await asyncio.sleep(0.05)
                # The Context only needs the URLs and the session: no subprocess runs the server here.
                fake = AetrServer(url, workdir / "unused.log", {})
                fake.url = f"http://127.0.0.1:{port}"
                ctx = Context(db=db, database_url=url, server=fake, svc=svc, http=http, sizes=Sizes(), quick=True,
                              timeout_factor=1.0, label="sqltrace")
                await put_step(ctx, {"name": "chain", "kind": "sequential", "children": [
                    {"step": api_step(f"c-{i:03d}", f"{svc.url}/step")} for i in range(steps)]})
                await start_run(ctx, "chain")
                await svc.wait(http, 60, accepted=steps)
                await asyncio.sleep(0.5)  # let the warm-up's last dispatch bookkeeping finish
                tracer.active = True
                for i in range(runs):
                    await start_run(ctx, "chain")
                    await svc.wait(http, 60, accepted=steps * (i + 2))
                await asyncio.sleep(0.5)
                tracer.active = False
            finally:
                server.should_exit = True
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.wait_for(serving, 30)
        print_report(tracer, db, steps * runs)
    finally:
        await svc.stop()


def print_report(tracer: Tracer, db: str, n_steps: int) -> None:
    """Statements per step, by task kind, with the mean time of each."""
    print(f"{db}: SQL per step, averaged over {n_steps} steps of sequential chains "
          "(run starts included, spread over their steps)")
    by_task: defaultdict[str, list[tuple[str, int, float]]] = defaultdict(list)
    for (task, what), count in tracer.statements.items():
        by_task[task].append((what, count, tracer.seconds.get((task, what), 0.0)))
    for task, rows in sorted(by_task.items(), key=lambda kv: -sum(r[1] for r in kv[1])):
        total = sum(r[1] for r in rows)
        print(f"  {task}: {total / n_steps:.2f} per step")
        for what, count, seconds in sorted(rows, key=lambda r: -r[1]):
            mean = f"{seconds / count * 1000:6.3f} ms each" if seconds else ""
            print(f"    {count / n_steps:6.2f}  {what:<40} {mean}")
    print("driver calls per step (each a network round trip on PostgreSQL, a thread hop on SQLite):")
    wire_by_task: defaultdict[str, list[tuple[str, int]]] = defaultdict(list)
    for (task, what), count in tracer.wire.items():
        wire_by_task[task].append((what, count))
    grand = sum(tracer.wire.values())
    for task, calls in sorted(wire_by_task.items(), key=lambda kv: -sum(r[1] for r in kv[1])):
        print(f"  {task}: {sum(r[1] for r in calls) / n_steps:.2f} per step")
        for what, count in sorted(calls, key=lambda r: -r[1]):
            print(f"    {count / n_steps:6.2f}  {what}")
    print(f"  total: {grand / n_steps:.2f} per step")


def main() -> None:
    """Parse the command line and trace."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", choices=("sqlite", "postgres"), default="sqlite")
    parser.add_argument("--steps", type=int, default=100, help="api steps in the sequential chain")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--postgres-url", default=DEFAULT_POSTGRES_URL)
    args = parser.parse_args()
    log(f"tracing {args.runs} runs of a {args.steps}-step chain on {args.db}")
    try:
        import uvloop
    except ImportError:  # plain asyncio works too
        asyncio.run(run(args.db, args.steps, args.runs, args.postgres_url))
        return
    uvloop.run(run(args.db, args.steps, args.runs, args.postgres_url))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
