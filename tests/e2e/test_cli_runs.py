"""`aetr run --wait` and `aetr runs signal` against the real server: how a user learns that a run failed, and why,
and how a person answers a run that waits for them."""

from __future__ import annotations

import asyncio
import re
import time
from typing import Any

import aiohttp
import orjson

from aetr.client import Client
from aetr.testing import StepService, status, sync
from tests.e2e.harness import AetrServer, Api, cli, nodes_by_name


async def test_run_wait_exits_1_and_prints_the_failing_step_and_its_answer_to_stderr(
        aetr: AetrServer, http: aiohttp.ClientSession) -> None:
    async with StepService() as svc:
        svc.route("/reject", status(400, {"detail": "sku is required"}))
        api = Api(http, aetr.url)
        # Attempts to spare: a 4xx must still fail the run at once, not be retried.
        await api.put_step({"name": "reject", "kind": "api", "url": svc.url("/reject"),
                            "retry": {"max_attempts": 3, "backoff_s": 0.1}})

        ran = await cli("--url", aetr.url, "run", "reject", "--input", '{"title": "widget"}', "--wait")

        assert ran.code == 1, ran
        assert ran.stdout == "", ran
        started = re.search(r"run ([0-9a-f-]{36}) started", ran.stderr)
        assert started, ran
        run_id = started[1]
        line = " ".join(ran.stderr.split())  # one logical line, however the terminal wrapped it
        assert f"run {run_id} ended in error at step reject (http):" in line, ran
        assert "HTTP 400" in line and "sku is required" in line, ran
        assert [c.json for c in svc.calls("/reject")] == [{"title": "widget"}]
        run = await api.run(run_id)
        assert run["state"] == "error" and run["error"]["kind"] == "http" and run["error"]["step"] == "reject", run


async def awaiting_signal(api: Api, run_id: str, name: str, timeout: float = 10.0) -> dict[str, Any]:  # noqa: ASYNC109
    """The node of step `name` once it awaits its signal."""
    deadline = time.monotonic() + timeout
    while True:
        node = nodes_by_name(await api.run(run_id)).get(name)
        if node is not None and node["awaits_signal"]:
            return node
        assert time.monotonic() < deadline, f"{name} of run {run_id} does not await a signal: {node}"
        await asyncio.sleep(0.05)


async def put_approval(api: Api, svc: StepService) -> None:
    """`approval`: a signal wait, then an api step that gets the signal's output as its input."""
    svc.route("/record", sync(lambda answer: {"recorded": answer}))
    await api.put_step({"name": "approval", "kind": "sequential", "children": [
        {"step": {"name": "approve", "kind": "wait", "signal": True, "timeout_s": 60}},
        {"step": {"name": "record", "kind": "api", "url": svc.url("/record"), "mode": "sync"}}]})


async def test_runs_signal_completes_the_wait_and_the_run_goes_on_with_its_output(
        aetr: AetrServer, http: aiohttp.ClientSession) -> None:
    async with StepService() as svc:
        api = Api(http, aetr.url)
        await put_approval(api, svc)
        run_id = await api.start_run("approval", {"order": 7})
        wait = await awaiting_signal(api, run_id, "approve")

        shown = await cli("--url", aetr.url, "runs", "show", run_id)
        assert shown.code == 0, shown
        assert f"awaiting signal node {wait['id']}" in " ".join(shown.stdout.split()), shown

        signalled = await cli("--url", aetr.url, "runs", "signal", run_id, wait["id"],
                              "--output", '{"approved": true}')
        assert signalled.code == 0, signalled
        assert re.search(r"approve\s+wait\s+complete", signalled.stdout), signalled

        run = await api.wait_run(run_id)
        assert run["state"] == "complete", run
        assert run["output"] == {"recorded": {"approved": True}}, run
        assert [c.json for c in svc.calls("/record")] == [{"approved": True}]

        again = await cli("--url", aetr.url, "runs", "signal", run_id, wait["id"], "--output", "1")
        assert again.code == 2, again
        assert again.stderr.startswith(f"error: cannot signal node '{wait['id']}': "), again
        assert "(HTTP 409)" in again.stderr, again


async def test_runs_signal_error_fails_the_run_and_the_client_sends_a_null_output(
        aetr: AetrServer, http: aiohttp.ClientSession) -> None:
    async with StepService() as svc:
        api = Api(http, aetr.url)
        await put_approval(api, svc)
        refused, approved = await api.start_run("approval", {}), await api.start_run("approval", {})

        wait = await awaiting_signal(api, refused, "approve")
        failed = await cli("--url", aetr.url, "runs", "signal", refused, wait["id"], "--error", "over budget",
                           "--json")
        assert failed.code == 0, failed
        tree = nodes_by_name(orjson.loads(failed.stdout))
        assert tree["approve"]["state"] == "error", failed
        run = await api.wait_run(refused)
        assert run["state"] == "error", run
        assert run["error"]["kind"] == "signal" and run["error"]["message"] == "over budget", run
        assert svc.calls("/record") == []

        wait = await awaiting_signal(api, approved, "approve")
        async with Client(aetr.url) as client:
            answered = await client.signal(approved, wait["id"], output=None)
        assert nodes_by_name(answered)["approve"]["state"] == "complete", answered
        run = await api.wait_run(approved)
        assert run["state"] == "complete" and run["output"] == {"recorded": None}, run


async def test_runs_delete_and_purge_remove_ended_runs_and_say_how_many(
        aetr: AetrServer, http: aiohttp.ClientSession) -> None:
    api = Api(http, aetr.url)
    await api.put_step({"name": "quick", "kind": "sequential"})
    first, *others = [await api.start_run("quick", i) for i in range(4)]
    for run_id in (first, *others):
        await api.wait_run(run_id)

    deleted = await cli("--url", aetr.url, "runs", "delete", first[:13])
    assert deleted.code == 0 and deleted.stdout.strip() == f"run {first}: deleted", deleted
    assert (await api.call("GET", f"/api/v1/runs/{first}"))[0] == 404
    again = await cli("--url", aetr.url, "runs", "delete", first)
    assert again.code == 2 and f"no run with id '{first}' (HTTP 404)" in again.stderr, again

    kept = await cli("--url", aetr.url, "runs", "purge", "--older-than", "30d", "--json")
    assert kept.code == 0 and orjson.loads(kept.stdout) == {"deleted": 0}, kept
    purged = await cli("--url", aetr.url, "runs", "purge", "--older-than", "0s")
    assert purged.code == 0 and purged.stdout.strip() == "deleted 3 runs that ended more than 0s ago", purged
    _, page = await api.call("GET", "/api/v1/runs")
    assert page["runs"] == []
