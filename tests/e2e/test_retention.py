"""Two `aetr serve` processes with retention on, on one PostgreSQL database: one of them deletes, never both;
when it stops, the other takes over."""

from __future__ import annotations

import asyncio
import re

import aiohttp
import pytest

from tests.e2e.harness import AetrServer, Api, Launcher

pytestmark = pytest.mark.parametrize(
    "database_url", [pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True)

KEEP_DAYS = 1 / 86_400  # a second
RUNS = 10  # runs started through each process in each round
DELETED_WITHIN_S = 45.0  # due a second after their end; the loop looks every 10 s


async def deleted_by_retention(http: aiohttp.ClientSession, server: AetrServer) -> float:
    """The runs this process deleted by retention, as its /metrics counts them."""
    async with http.get(f"{server.url}/metrics") as resp:
        text = await resp.text()
    found = re.search(r'^aetr_runs_deleted_total\{how="retention"\} (\S+)$', text, re.MULTILINE)
    return float(found[1]) if found else 0.0


async def round_of_runs(apis: list[Api]) -> list[str]:
    """RUNS runs started through each process (of an empty sequence: each ends as it starts)."""
    return [await api.start_run("quick", i) for api in apis for i in range(RUNS)]


async def all_gone(api: Api, ids: list[str]) -> None:
    deadline = asyncio.get_running_loop().time() + DELETED_WITHIN_S
    for run_id in ids:
        while (await api.call("GET", f"/api/v1/runs/{run_id}"))[0] != 404:
            assert asyncio.get_running_loop().time() < deadline, f"run {run_id} not deleted in {DELETED_WITHIN_S} s"
            await asyncio.sleep(0.2)


async def test_one_process_deletes_and_the_other_takes_over_when_it_stops(
        launcher: Launcher, database_url: str, http: aiohttp.ClientSession) -> None:
    env = {"AETR_RETENTION_DAYS": repr(KEEP_DAYS)}
    servers = [await launcher.serve(database_url, env=env), await launcher.serve(database_url, env=env)]
    apis = [Api(http, s.url) for s in servers]
    await apis[0].put_step({"name": "quick", "kind": "sequential"})

    first = await round_of_runs(apis)
    await all_gone(apis[0], first)
    counts = [await deleted_by_retention(http, s) for s in servers]
    assert sorted(counts) == [0, 2 * RUNS], counts  # one process deleted them all, the other none

    deleter = counts.index(2 * RUNS)
    await servers[deleter].stop()
    survivor = servers[1 - deleter]
    second = await round_of_runs([apis[1 - deleter]])
    await all_gone(apis[1 - deleter], second)
    assert await deleted_by_retention(http, survivor) == RUNS
