"""`aetr run --wait` against the real server: how a user learns that a run failed, and why."""

from __future__ import annotations

import re

import aiohttp

from aetr.testing import StepService, status
from tests.e2e.harness import AetrServer, Api, cli


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
