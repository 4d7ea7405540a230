"""`aetr serve --workers 2`: two processes serve one port and one database, and stop together.

Runs are started, called back and read through the one port, whichever process takes each request, on SQLite
(two processes writing one file) and on PostgreSQL.
"""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import aiohttp

from aetr.testing import StepService, callback
from tests.e2e.harness import Api, Launcher

RUNS = 40


def worker_processes(pid: int) -> set[int]:
    """The multiprocessing workers `pid` started (not its resource tracker)."""
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat[stat.rindex(")") + 2:].split()[1]) == pid and b"spawn_main" in (entry / "cmdline").read_bytes():
                found.add(int(entry.name))
    return found


async def test_two_worker_processes_share_the_port_and_the_database(
        launcher: Launcher, database_url: str, http: aiohttp.ClientSession) -> None:
    server = await launcher.serve(database_url, env={"AETR_WORKERS": "2"})
    workers = worker_processes(server.pid)
    assert len(workers) == 2, f"expected 2 worker processes, found {workers}; log:\n{server.log()}"
    async with StepService() as svc:
        svc.route("/inc", callback(lambda n: n + 1))
        api = Api(http, server.url)
        await api.put_step({"name": "inc", "kind": "api", "url": svc.url("/inc")})
        await api.put_step({"name": "three", "kind": "sequential", "children": [{"step": "inc"}] * 3})
        run_ids = await asyncio.gather(*(api.start_run("three", i) for i in range(RUNS)))
        runs = await asyncio.gather(*(api.wait_run(r, timeout=60) for r in run_ids))
        assert [(r["state"], r["output"]) for r in runs] == [("complete", i + 3) for i in range(RUNS)]
        assert len(svc.calls("/inc")) == 3 * RUNS  # each step called once: no call made by both processes

        # A step changed through either process: every start after it, on either process, runs the new one.
        svc.route("/double", callback(lambda n: n * 2))
        await api.put_step({"name": "inc", "kind": "api", "url": svc.url("/double")})
        again = await asyncio.gather(*(api.start_run("three", i) for i in range(1, RUNS // 4 + 1)))
        runs = await asyncio.gather(*(api.wait_run(r, timeout=60) for r in again))
        assert [(r["state"], r["output"]) for r in runs] == [("complete", i * 8) for i in range(1, RUNS // 4 + 1)]
        assert len(svc.calls("/inc")) == 3 * RUNS

    os.kill(server.pid, signal.SIGTERM)
    assert await server.wait_exit(30) == 0, server.log()
    deadline = asyncio.get_running_loop().time() + 10
    while any(os.path.exists(f"/proc/{pid}") for pid in workers):  # noqa: ASYNC240 -- /proc, no I/O wait
        assert asyncio.get_running_loop().time() < deadline, "a worker process outlived the server by 10 s"
        await asyncio.sleep(0.05)
