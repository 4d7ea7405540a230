"""A 429 with `Retry-After` is retried no sooner than the step asked, whatever its own backoff says."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from datetime import datetime
from email.utils import formatdate
from typing import Any

from aiohttp import web

from aetr.testing import Behaviour, StepRequest, StepService, callback, sequence
from tests.integration.conftest import Server

# The step's own backoff is far shorter than any Retry-After here: only the header can explain a long wait.
RETRY = {"max_attempts": 3, "backoff_s": 0.05, "max_backoff_s": 0.05}
CLOCK_SLACK_S = 0.05  # seconds: the server's and this process's clocks are read at slightly different moments
UNHURRIED_S = 0.5  # seconds within which a retry without Retry-After comes (backoff ≤ 0.05 s, plus polling)


def busy(retry_after: Callable[[], str | None]) -> Behaviour:
    """Answer 429 Too Many Requests, with the Retry-After header `retry_after()` gives (none for None)."""

    async def behaviour(request: StepRequest) -> web.StreamResponse:
        value = retry_after()
        return web.Response(status=429, text="slow down", headers={} if value is None else {"Retry-After": value})

    return behaviour


def step(svc: StepService, name: str) -> dict[str, Any]:
    return {"name": name, "kind": "api", "url": svc.url(f"/{name}"), "timeout_s": 30, "retry": RETRY}


async def test_a_429_with_retry_after_seconds_is_retried_no_sooner_and_the_history_shows_it(
        aetr: Server, steps_service: StepService) -> None:
    steps_service.route("/busy", sequence(busy(lambda: "1"), callback(lambda x: {"done": x})))
    await aetr.put_step(step(steps_service, "busy"))

    run_id = await aetr.start("busy", 7)
    run = await aetr.wait_run(run_id)

    assert run["state"] == "complete" and run["output"] == {"done": 7}, run
    first, second = steps_service.calls("/busy")
    assert [first.attempt, second.attempt] == [1, 2]
    waited = second.received_at - first.received_at
    assert waited >= 1.0 - CLOCK_SLACK_S, f"the retry came {waited:.3f} s after the 429 asking for 1 s"
    events = await aetr.events(run_id)
    (retry,) = [e for e in events if e["kind"] == "retry"]
    assert retry["node_id"] == run_id
    assert retry["data"]["attempt"] == 1 and retry["data"]["next_attempt"] == 2
    assert retry["data"]["kind"] == "http" and retry["data"]["delay_s"] >= 1.0
    assert "HTTP 429" in retry["data"]["error"] and "Retry-After: 1" in retry["data"]["error"], retry
    # The failed attempt's answer and its retry (one transaction), then the second call a second later, then
    # its callback.
    (failed,) = [e for e in events if e["kind"] == "dispatch" and e["data"]["attempt"] == 1]
    (called,) = [e for e in events if e["kind"] == "dispatch" and e["data"]["attempt"] == 2]
    (taken,) = [e for e in events if e["kind"] == "callback"]
    assert failed["data"]["outcome"] == "accepted" and failed["at"] == retry["at"], events
    assert max(failed["id"], retry["id"]) < called["id"] < taken["id"], events
    assert called["data"]["status"] == 202
    assert taken["data"] == {"attempt": 2, "report": "output", "outcome": "accepted", "step": "busy"}
    gap = (datetime.fromisoformat(called["at"]) - datetime.fromisoformat(retry["at"])).total_seconds()
    assert gap >= 1.0, f"by the server's clock the second call was made {gap:.3f} s after the 429"


async def test_a_429_with_a_retry_after_date_is_retried_no_sooner_than_that_date(
        aetr: Server, steps_service: StepService) -> None:
    # An HTTP date has whole seconds: name the second after next, so the wait is between 1 and 2 s.
    not_before: list[float] = []

    def date() -> str:
        not_before.append(math.floor(time.time()) + 2.0)
        return formatdate(not_before[-1], usegmt=True)

    seen_at: list[float] = []

    async def second_call(request: StepRequest) -> web.StreamResponse:
        seen_at.append(time.time())
        return await callback(lambda x: {"done": x})(request)

    steps_service.route("/dated", sequence(busy(date), second_call))
    await aetr.put_step(step(steps_service, "dated"))

    run = await aetr.wait_run(await aetr.start("dated", 8))

    assert run["state"] == "complete" and run["output"] == {"done": 8}, run
    assert [c.attempt for c in steps_service.calls("/dated")] == [1, 2]
    (deadline,), (came,) = not_before, seen_at
    assert came >= deadline - CLOCK_SLACK_S, f"the retry came {deadline - came:.3f} s before the Retry-After date"
    (retry,) = [e for e in await aetr.events(run["id"]) if e["kind"] == "retry"]
    assert "HTTP 429" in retry["data"]["error"] and "GMT" in retry["data"]["error"], retry


async def test_a_429_without_retry_after_is_retried_after_the_step_s_own_short_backoff(
        aetr: Server, steps_service: StepService) -> None:
    # The control for the two tests above: the same step, with no header, is retried at once.
    steps_service.route("/plain", sequence(busy(lambda: None), callback(lambda x: {"done": x})))
    await aetr.put_step(step(steps_service, "plain"))

    run = await aetr.wait_run(await aetr.start("plain", 9))

    assert run["state"] == "complete" and run["output"] == {"done": 9}, run
    first, second = steps_service.calls("/plain")
    assert second.received_at - first.received_at < UNHURRIED_S
