"""Run-end notifications: they survive a SIGKILL between a run's end and its delivery (one accepted event per
run), and the CLI asks for them and shows their tries."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, closing
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import asyncpg
import orjson
from aiohttp import web

from tests.e2e.harness import AetrServer, Api, Launcher, cli

FAST = {"AETR_NOTIFY_BACKOFF_S": "0.2", "AETR_NOTIFY_MAX_BACKOFF_S": "0.5"}
WAIT_S = 30.0  # seconds for what the test waits on (a loaded runner is slow)


@dataclass
class Receiver:
    """Holds every notification until the server is dead and refuses it then; accepts every one after that."""

    tries: list[dict[str, Any]] = field(default_factory=list)  # {"body", "accepted"} in arrival order
    server_dead: asyncio.Event = field(default_factory=asyncio.Event)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    url: str = ""

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = orjson.loads(await request.read())
        accepted = self.server_dead.is_set()
        self.tries.append({"body": body, "accepted": accepted})
        self.arrived.set()
        if not accepted:
            await self.server_dead.wait()  # the answer goes to a dead process: it never learns of it
            return web.Response(status=503)
        return web.Response(status=202)

    def subjects(self, accepted: bool | None = None) -> Counter[str]:
        return Counter(t["body"]["subject"] for t in self.tries if accepted is None or t["accepted"] == accepted)

    async def until(self, condition: Callable[[], bool], what: str) -> None:
        """Wait for `condition`, re-checked at each notification received; fail saying `what` after WAIT_S."""
        try:
            async with asyncio.timeout(WAIT_S):
                while not condition():
                    self.arrived.clear()
                    await self.arrived.wait()
        except TimeoutError:
            raise AssertionError(f"{what} within {WAIT_S:g} s; tries so far: {self.tries}") from None


@asynccontextmanager
async def receiver() -> AsyncIterator[Receiver]:
    rec = Receiver()
    app = web.Application()
    app.router.add_post("/hook", rec.handle)
    runner = web.AppRunner(app, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    rec.url = f"http://127.0.0.1:{runner.addresses[0][1]}/hook"
    try:
        yield rec
    finally:
        rec.server_dead.set()  # release any held request
        await runner.cleanup()


async def notify_rows(database_url: str) -> int:
    """Notifications still to be delivered, as the database says."""
    query = "SELECT count(*) FROM work WHERE kind = 'notify'"
    if database_url.startswith("sqlite:///"):
        with closing(sqlite3.connect(database_url.removeprefix("sqlite:///"))) as db:
            return int(db.execute(query).fetchone()[0])
    conn = await asyncpg.connect(database_url, timeout=5)
    try:
        return int(await conn.fetchval(query))
    finally:
        await conn.close()


async def eventually(check: Callable[[], Awaitable[bool]], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not await check():
        assert time.monotonic() < deadline, f"{what} within {WAIT_S:g} s"
        await asyncio.sleep(0.1)


async def test_runs_ended_before_a_sigkill_are_each_announced_once_after_the_restart(
        launcher: Launcher, database_url: str, http: aiohttp.ClientSession) -> None:
    async with receiver() as rec:
        aetr = await launcher.serve(database_url, env=FAST)
        api = Api(http, aetr.url)
        await api.put_step({"name": "quick", "kind": "wait", "seconds": 0})
        await api.put_step({"name": "approval", "kind": "wait", "signal": True})
        runs: dict[str, str] = {}

        async def start(step: str) -> str:
            status, body = await api.call("POST", "/api/v1/runs", {"step": step, "notify": rec.url})
            assert status == 201, body
            return str(body["id"])

        for _ in range(3):
            runs[await start("quick")] = "complete"
            failed, cancelled = await start("approval"), await start("approval")
            status, body = await api.call("POST", f"/api/v1/runs/{failed}/nodes/{failed}/signal", {"error": "no"})
            assert status == 200, body
            status, body = await api.call("POST", f"/api/v1/runs/{cancelled}/cancel")
            assert status == 200, body
            runs |= {failed: "error", cancelled: "cancelled"}
        # Every run has ended and its delivery is under way, held by the receiver: kill the server now.
        await rec.until(lambda: set(rec.subjects()) == set(runs), "a notification of every run did not arrive")
        aetr.kill()
        rec.server_dead.set()
        assert not rec.subjects(accepted=True)

        restarted = await launcher.serve(database_url, port=aetr.port, env=FAST)
        api = Api(http, restarted.url)
        await rec.until(lambda: set(rec.subjects(accepted=True)) == set(runs),
                        "a notification of every run was not accepted after the restart")
        await eventually(lambda: _no_rows(database_url), "the deliveries were not all recorded")

        assert rec.subjects(accepted=True) == Counter(dict.fromkeys(runs, 1))  # exactly one accepted event each
        kinds = {"complete": "aetr.run.completed", "error": "aetr.run.failed", "cancelled": "aetr.run.cancelled"}
        for run_id, state in runs.items():
            tries = [t["body"] for t in rec.tries if t["body"]["subject"] == run_id]
            assert len({t["id"] for t in tries}) == 1, tries  # every try, before and after the kill, one id
            assert {t["type"] for t in tries} == {kinds[state]}
            assert tries[-1]["data"]["state"] == state
            history = [e["data"] for e in await api.events(run_id) if e["kind"] == "notify"]
            assert [h["outcome"] for h in history].count("delivered") == 1, history
            assert history[-1]["outcome"] == "delivered"


async def _no_rows(database_url: str) -> bool:
    return await notify_rows(database_url) == 0


async def test_aetr_run_notify_has_the_end_announced_and_runs_events_shows_the_try(
        aetr: AetrServer, http: aiohttp.ClientSession) -> None:
    async with receiver() as rec:
        rec.server_dead.set()  # accept at once
        await Api(http, aetr.url).put_step({"name": "quick", "kind": "wait", "seconds": 0})
        ran = await cli("--url", aetr.url, "run", "quick", "--notify", rec.url)
        assert ran.code == 0, ran
        run_id = ran.stdout.strip()
        await rec.until(lambda: rec.subjects(accepted=True) == Counter({run_id: 1}), "the run's end was not announced")

        async def shown() -> bool:
            events = await cli("--url", aetr.url, "runs", "events", run_id)
            assert events.code == 0, events
            return "notify" in events.stdout and "delivered" in events.stdout

        await eventually(shown, "`aetr runs events` did not show the delivery")
        refused = await cli("--url", aetr.url, "run", "quick", "--notify", "ftp://example.com/hook")
        assert refused.code != 0 and "notify: must be an absolute http:// or https:// URL" in refused.stderr, refused
