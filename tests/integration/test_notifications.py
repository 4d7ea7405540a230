"""Run-end notifications over real HTTP: a CloudEvent per ended run, retried until a receiver accepts it."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web
from sqlalchemy import func, select

from aetr.domain.hosts import AllowedHosts
from aetr.store.tables import work
from tests.integration.conftest import Server, running_server

FAST = {"notify_backoff_s": 0.05, "notify_max_backoff_s": 0.2}


@dataclass
class Receiver:
    """A notification receiver on a loopback port: it refuses each run's first `refusals` tries with 503."""

    refusals: int = 2
    tries: list[dict[str, Any]] = field(default_factory=list)  # every request: headers and parsed body
    url: str = ""
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle(self, request: web.Request) -> web.Response:
        body = orjson.loads(await request.read())
        earlier = [t for t in self.tries if t["body"]["subject"] == body["subject"]]
        accepted = len(earlier) >= self.refusals
        self.tries.append({"content_type": request.headers.get("Content-Type"), "body": body, "accepted": accepted})
        self.changed.set()
        return web.Response(status=204) if accepted else web.Response(status=503, text="not now")

    def accepted(self, run_id: str) -> list[dict[str, Any]]:
        return [t["body"] for t in self.tries if t["accepted"] and t["body"]["subject"] == run_id]

    async def until(self, condition: Callable[[], bool], timeout: float = 15.0) -> None:  # noqa: ASYNC109
        """Wait for `condition` to hold, re-checked at each request received; fail after `timeout` seconds."""
        async with asyncio.timeout(timeout):
            while not condition():
                self.changed.clear()
                await self.changed.wait()


@asynccontextmanager
async def receiver(refusals: int = 2) -> AsyncIterator[Receiver]:
    rec = Receiver(refusals)
    app = web.Application()
    app.router.add_post("/hook", rec.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    rec.url = f"http://127.0.0.1:{port}/hook"
    try:
        yield rec
    finally:
        await runner.cleanup()


async def start(aetr: Server, step: str, notify: str) -> str:
    status, body = await aetr.call("POST", "/api/v1/runs", {"step": step, "notify": notify})
    assert status == 201, body
    return str(body["id"])


async def delivered(aetr: Server, run_id: str) -> bool:
    """Whether the run's history records its notification as delivered (or given up)."""
    return any(e["kind"] == "notify" and e["data"]["outcome"] in ("delivered", "gave_up")
               for e in await aetr.events(run_id))


async def eventually(check: Callable[[], Awaitable[bool]], what: str, timeout: float = 15.0) -> None:  # noqa: ASYNC109
    """Poll `check` until it holds; fail saying `what` did not happen within `timeout` seconds."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not await check():
        assert asyncio.get_running_loop().time() < deadline, f"{what} within {timeout} s"
        await asyncio.sleep(0.05)


async def deliveries(aetr: Server) -> dict[str, float]:
    """The notification tries /metrics counts, by outcome."""
    status, text = await aetr.call("GET", "/metrics")
    assert status == 200
    found = re.findall(r'^aetr_notifications_total\{outcome="(\w+)"\} (\S+)$', text.decode(), re.MULTILINE)
    return {outcome: float(value) for outcome, value in found}


async def notify_rows(aetr: Server) -> int:
    async with aetr.engine.store.engine.connect() as conn:
        count = (await conn.execute(select(func.count()).select_from(work).where(work.c.kind == "notify"))).scalar()
    return int(count or 0)


async def test_each_ended_run_is_announced_once_by_a_receiver_that_refuses_twice(database_url: str) -> None:
    async with receiver(refusals=2) as rec, running_server(database_url, **FAST) as aetr:
        await aetr.put_step({"name": "quick", "kind": "wait", "seconds": 0})
        await aetr.put_step({"name": "approval", "kind": "wait", "signal": True})
        counted = await deliveries(aetr)
        completed = await start(aetr, "quick", rec.url)
        failed = await start(aetr, "approval", rec.url)
        cancelled = await start(aetr, "approval", rec.url)
        status, body = await aetr.call("POST", f"/api/v1/runs/{failed}/nodes/{failed}/signal", {"error": "no"})
        assert status == 200, body
        status, body = await aetr.call("POST", f"/api/v1/runs/{cancelled}/cancel")
        assert status == 200, body
        runs = {completed: "complete", failed: "error", cancelled: "cancelled"}
        await rec.until(lambda: all(rec.accepted(r) for r in runs))
        for run_id in runs:
            await eventually(lambda r=run_id: delivered(aetr, r), f"run {run_id}'s delivery was not recorded")  # type: ignore[misc]
        assert await notify_rows(aetr) == 0  # nothing is left to deliver: no second accepted event can come
        now = await deliveries(aetr)
        assert now.get("delivered", 0) - counted.get("delivered", 0) == 3
        assert now.get("failed", 0) - counted.get("failed", 0) == 6

        for run_id, state in runs.items():
            run = await aetr.wait_run(run_id)
            (event,) = rec.accepted(run_id)
            tries = [t for t in rec.tries if t["body"]["subject"] == run_id]
            assert len(tries) == 3
            assert {t["content_type"] for t in tries} == {"application/cloudevents+json"}
            assert {t["body"]["id"] for t in tries} == {event["id"]}  # one id for every try of one run end
            kind = {"complete": "completed", "error": "failed", "cancelled": "cancelled"}[state]
            assert event["type"] == f"aetr.run.{kind}"
            assert event["specversion"] == "1.0"
            assert event["source"] == aetr.base_url
            assert event["data"]["id"] == run_id and event["data"]["state"] == state
            assert event["data"]["step"] == run["step"]["name"]
            assert event["data"]["output"] == run["output"] and event["data"]["error"] == run["error"]
            assert event["data"]["ended_at"] is not None
            queued, *history = [e for e in await aetr.events(run_id) if e["kind"] == "notify"]
            assert queued["data"] == {"outcome": "queued", "id": event["id"], "url": rec.url,
                                      "step": run["step"]["name"]}
            assert [(e["data"]["attempt"], e["data"]["status"], e["data"]["outcome"]) for e in history] == [
                (1, 503, "failed"), (2, 503, "failed"), (3, 204, "delivered")]
            assert {e["data"]["id"] for e in history} == {event["id"]}
        assert len({rec.accepted(r)[0]["id"] for r in runs}) == 3


async def test_a_notification_nobody_accepts_is_given_up_after_the_window(database_url: str) -> None:
    async with receiver(refusals=1_000) as rec, running_server(database_url, notify_window_s=0.3, **FAST) as aetr:
        await aetr.put_step({"name": "quick", "kind": "wait", "seconds": 0})
        run_id = await start(aetr, "quick", rec.url)
        await eventually(lambda: delivered(aetr, run_id), "the notification was not given up")
        queued, *history = [e["data"] for e in await aetr.events(run_id) if e["kind"] == "notify"]
        assert queued["outcome"] == "queued"
        assert [h["outcome"] for h in history[:-1]] == ["failed"] * (len(history) - 1)
        assert "within 0.3 s of the run's end" in history[-1]["reason"]
        assert await notify_rows(aetr) == 0
        assert len(rec.tries) == len(history)


async def test_a_run_without_notify_leaves_no_notification_work(aetr: Server) -> None:
    await aetr.put_step({"name": "quick", "kind": "wait", "seconds": 0})
    run = await aetr.wait_run(await aetr.start("quick"))
    assert run["state"] == "complete"
    assert await notify_rows(aetr) == 0
    assert not [e for e in await aetr.events(run["id"]) if e["kind"] == "notify"]


async def test_bad_notify_urls_are_refused_and_start_nothing(aetr: Server) -> None:
    await aetr.put_step({"name": "quick", "kind": "wait", "seconds": 0})
    for url, why in [("ftp://example.com/hook", "must be an absolute http:// or https:// URL"),
                     ("example.com/hook", "must be an absolute http:// or https:// URL"),
                     ("http://exa mple.com/", "must not contain spaces"),
                     ("http://example.com:99999/", "is not a valid URL"),
                     (12, "string")]:
        status, body = await aetr.call("POST", "/api/v1/runs", {"step": "quick", "notify": url})
        assert status == 422, (url, body)
        assert "notify" in str(body["detail"]) and why in str(body["detail"]), (url, body)
    status, page = await aetr.call("GET", "/api/v1/runs")
    assert status == 200 and page["runs"] == []


async def test_a_notify_url_outside_the_step_host_allow_list_is_refused(database_url: str) -> None:
    allowed = AllowedHosts.parse("hooks.example.com,10.0.0.0/8")
    async with running_server(database_url, allowed_step_hosts=allowed) as aetr:
        await aetr.put_step({"name": "quick", "kind": "wait", "seconds": 0})
        status, body = await aetr.call("POST", "/api/v1/runs", {"step": "quick", "notify": "http://127.0.0.1:9/h"})
        assert status == 422, body
        assert body["detail"].startswith("notify: '127.0.0.1' is not within AETR_ALLOWED_STEP_HOSTS"), body
        status, page = await aetr.call("GET", "/api/v1/runs")
        assert page["runs"] == []
        status, body = await aetr.call("POST", "/api/v1/runs", {"step": "quick",
                                                                 "notify": "https://hooks.example.com/h"})
        assert status == 201, body


async def test_a_run_retried_before_its_end_was_announced_announces_only_its_next_end(database_url: str) -> None:
    # A long first wait: the run is retried between the failed end's first try and its second.
    async with receiver(refusals=1) as rec, running_server(database_url, notify_backoff_s=2.0) as aetr:
        await aetr.put_step({"name": "approval", "kind": "wait", "signal": True})
        run_id = await start(aetr, "approval", rec.url)
        status, body = await aetr.call("POST", f"/api/v1/runs/{run_id}/nodes/{run_id}/signal", {"error": "no"})
        assert status == 200, body
        await rec.until(lambda: len(rec.tries) == 1)
        status, body = await aetr.call("POST", f"/api/v1/runs/{run_id}/retry")
        assert status == 200, body
        status, body = await aetr.call("POST", f"/api/v1/runs/{run_id}/nodes/{run_id}/signal", {"output": {"ok": 1}})
        assert status == 200, body
        await rec.until(lambda: bool(rec.accepted(run_id)))
        await eventually(lambda: delivered(aetr, run_id), "the second end's delivery was not recorded")
        await eventually(lambda: _superseded(aetr, run_id), "the first end's notification was not dropped")
        (event,) = rec.accepted(run_id)
        assert event["type"] == "aetr.run.completed" and event["data"]["output"] == {"ok": 1}
        assert rec.tries[0]["body"]["type"] == "aetr.run.failed"
        assert rec.tries[0]["body"]["id"] != event["id"]
        assert len(rec.tries) == 2
        assert await notify_rows(aetr) == 0


async def _superseded(aetr: Server, run_id: str) -> bool:
    return any(e["kind"] == "notify" and e["data"]["outcome"] == "superseded" for e in await aetr.events(run_id))


async def test_a_notify_host_that_resolves_outside_the_allow_list_is_given_up_at_once(database_url: str) -> None:
    # With ranges listed, a name passes when the run starts: where it resolves is judged when the event is sent.
    allowed = AllowedHosts.parse("10.0.0.0/8")
    async with receiver() as rec, running_server(database_url, allowed_step_hosts=allowed, **FAST) as aetr:
        await aetr.put_step({"name": "quick", "kind": "wait", "seconds": 0})
        run_id = await start(aetr, "quick", rec.url.replace("127.0.0.1", "localhost"))
        await eventually(lambda: delivered(aetr, run_id), "the notification was not given up")
        _, *history = [e["data"] for e in await aetr.events(run_id) if e["kind"] == "notify"]
        assert [h["outcome"] for h in history] == ["gave_up"], history
        assert "none of them within AETR_ALLOWED_STEP_HOSTS" in history[0]["error"], history
        assert not rec.tries
        assert await notify_rows(aetr) == 0


async def test_a_scheduled_run_announces_its_end_to_the_schedules_notify_url(database_url: str) -> None:
    from tests.integration.test_schedules import START, controlled

    async with receiver(refusals=0) as rec, running_server(database_url, **FAST) as aetr:
        clock = await controlled(aetr)  # the "nightly" step: a signal wait, so the test decides when it ends
        status, body = await aetr.call("PUT", "/api/v1/schedules/announced", {
            "step": "nightly", "cron": "* * * * *", "notify": rec.url})
        assert status == 201, body
        clock.now = START.replace(minute=1, second=1)
        assert await aetr.engine.schedules.tick() == 1
        status, body = await aetr.call("GET", "/api/v1/schedules/announced")
        (run_id,) = [r["id"] for r in body["last_runs"]]
        status, answer = await aetr.call("POST", f"/api/v1/runs/{run_id}/nodes/{run_id}/signal", {"output": "ok"})
        assert status == 200, answer
        await rec.until(lambda: bool(rec.accepted(run_id)))
        (event,) = rec.accepted(run_id)
        assert event["type"] == "aetr.run.completed" and event["data"]["output"] == "ok"
