"""A run's history (`GET /runs/{id}/events`) tells what happened to it, everything, in the order it happened."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from itertools import pairwise
from typing import Any

from sqlalchemy import insert

from aetr.store import Store
from aetr.store.tables import events as events_table
from aetr.testing import Call, StepService, never
from tests.integration.conftest import Server

TIMEOUT_S = 2.0  # step b's deadline per attempt: one attempt is left to run out, the others are answered at once
RETRY = {"max_attempts": 3, "backoff_s": 0.05, "max_backoff_s": 0.05}
WAIT_S = 10.0  # seconds for an event the test expects to appear
POLL_S = 0.05  # seconds between two reads of the history while waiting for one

Event = dict[str, Any]
Line = tuple[str, str, tuple[Any, ...]]  # (kind, step name of its node, what the kind says)


# The data that tells one event of a kind from another.
DETAIL = {"run.started": ("step",), "state": ("from", "to"), "dispatch": ("attempt", "status"),
          "callback": ("attempt", "outcome"), "callback.fail": ("attempt", "outcome"),
          "retry": ("attempt", "next_attempt"), "timeout": ("attempt",), "cancel": ("from",), "run.retried": ("from",)}


def line(event: Event, names: dict[str, str]) -> Line:
    """The part of an event this test checks: its kind, its node, and the data that tells it apart."""
    data = event["data"]
    keys = DETAIL.get(event["kind"], tuple(sorted(data)))
    return event["kind"], names[event["node_id"]], tuple(data.get(key) for key in keys)


class History:
    """The events of one run, read over HTTP."""

    def __init__(self, aetr: Server, run_id: str) -> None:
        self.aetr = aetr
        self.run_id = run_id

    async def read(self) -> list[Event]:
        status, events = await self.aetr.call("GET", f"/api/v1/runs/{self.run_id}/events")
        assert status == 200, events
        result: list[Event] = events
        return result

    async def wait_for(self, what: str, found: Callable[[Event], bool]) -> None:
        """Wait until an event for which `found` is true is in the history (the engine writes some after answering)."""
        deadline = asyncio.get_running_loop().time() + WAIT_S
        while True:
            events = await self.read()
            if any(found(e) for e in events):
                return
            assert asyncio.get_running_loop().time() < deadline, f"no {what} within {WAIT_S} s: {events}"
            await asyncio.sleep(POLL_S)


async def post(aetr: Server, call: Call, suffix: str, body: Any) -> tuple[int, Any]:
    """Call back as the step service would, on the URL this call carried."""
    assert call.callback_url is not None
    return await aetr.call("POST", call.callback_url.removeprefix(aetr.base_url) + suffix, body)


async def test_the_history_records_every_kind_of_event_in_the_order_it_happened(
        aetr: Server, steps_service: StepService) -> None:
    svc = steps_service
    svc.route("/a", never())
    svc.route("/b", never())
    await aetr.put_step({"name": "hist", "kind": "sequential", "children": [
        {"step": {"name": "a", "kind": "api", "url": svc.url("/a")}},
        {"step": {"name": "b", "kind": "api", "url": svc.url("/b"), "timeout_s": TIMEOUT_S, "retry": RETRY}}]})
    run_id = await aetr.start("hist", {"n": 1})
    history = History(aetr, run_id)
    _, run = await aetr.call("GET", f"/api/v1/runs/{run_id}")
    names = {run_id: "hist", **{kid["id"]: kid["step"]["name"] for kid in run["children"]}}
    ids = {name: node for node, name in names.items()}

    def dispatched(name: str, attempt: int) -> Callable[[Event], bool]:
        """Whether an event is the 2xx answer to that attempt's call."""
        return lambda e: (e["kind"] == "dispatch" and e["node_id"] == ids[name]
                          and e["data"].get("attempt") == attempt and e["data"].get("status") == 202)

    # Each step below waits for the outcome of the one before, so the order of events is the order of steps.
    (a1,) = await svc.wait_for_calls("/a", 1)
    await history.wait_for("answer to a's call", dispatched("a", 1))
    assert await post(aetr, a1, "", {"a": 1}) == (200, {"accepted": True})
    (b1,) = await svc.wait_for_calls("/b", 1)
    await history.wait_for("answer to b's first call", dispatched("b", 1))
    assert await post(aetr, a1, "", {"a": 1}) == (200, {"accepted": False, "duplicate": True})
    assert await post(aetr, b1, "/fail", {"error": "disk full", "retryable": True}) == (200, {"accepted": True})
    b2 = (await svc.wait_for_calls("/b", 2))[1]
    await history.wait_for("answer to b's second call", dispatched("b", 2))
    status, body = await post(aetr, b1, "", {"b": "late"})
    assert status == 409 and "superseded by attempt 2" in body["detail"], body
    # b's second attempt gets no callback: its deadline passes, and a third attempt is called.
    b3 = (await svc.wait_for_calls("/b", 3, timeout=TIMEOUT_S + WAIT_S))[2]
    await history.wait_for("answer to b's third call", dispatched("b", 3))
    status, cancelled = await aetr.call("POST", f"/api/v1/runs/{run_id}/cancel")
    assert status == 200 and cancelled["state"] == "cancelled", cancelled
    status, body = await post(aetr, b3, "", {"b": "too late"})
    assert status == 409 and "cancelled" in body["detail"], body
    status, redriven = await aetr.call("POST", f"/api/v1/runs/{run_id}/retry")
    assert status == 200 and redriven["state"] == "executing", redriven
    b4 = (await svc.wait_for_calls("/b", 4))[3]
    await history.wait_for("answer to b's fourth call", dispatched("b", 4))
    assert await post(aetr, b4, "", {"b": 4}) == (200, {"accepted": True})
    done = await aetr.wait_run(run_id)
    assert done["state"] == "complete" and done["output"] == {"b": 4}, done
    assert [c.attempt for c in svc.calls("/b")] == [1, 2, 3, 4] and b2.attempt == 2

    events = await history.read()

    # One group per step of the test: what that step caused, in any order within the group (one transaction).
    expected: list[list[Line]] = [
        [("run.started", "hist", ("hist",)), ("state", "hist", ("pending", "executing")),
         ("state", "a", ("pending", "executing"))],
        [("dispatch", "a", (1, 202))],
        [("state", "a", ("executing", "complete")), ("state", "b", ("pending", "executing")),
         ("callback", "a", (1, "accepted"))],
        [("dispatch", "b", (1, 202))],
        [("callback", "a", (1, "duplicate"))],
        [("retry", "b", (1, 2)), ("callback.fail", "b", (1, "accepted"))],
        [("dispatch", "b", (2, 202))],
        [("callback", "b", (1, "refused"))],
        [("timeout", "b", (2,)), ("retry", "b", (2, 3))],
        [("dispatch", "b", (3, 202))],
        [("cancel", "hist", ("executing",)), ("state", "b", ("executing", "cancelled")),
         ("state", "hist", ("executing", "cancelled"))],
        [("callback", "b", (3, "refused"))],
        [("run.retried", "hist", ("cancelled",)), ("state", "hist", ("cancelled", "executing")),
         ("state", "b", ("cancelled", "executing"))],
        [("dispatch", "b", (4, 202))],
        [("state", "b", ("executing", "complete")), ("state", "hist", ("executing", "complete")),
         ("callback", "b", (4, "accepted"))],
    ]
    lines = [line(e, names) for e in events]
    assert len(lines) == sum(map(len, expected)), lines
    start = 0
    for group in expected:
        got = lines[start:start + len(group)]
        assert sorted(got, key=repr) == sorted(group, key=repr), (
            f"events {start}..{start + len(group) - 1}: expected {group}, got {got}; the whole history: {lines}")
        start += len(group)
    # What a step reported is listed before what it caused, and every line about a node names its step.
    assert lines.index(("callback", "a", (1, "accepted"))) < lines.index(("state", "a", ("executing", "complete")))
    assert lines.index(("callback.fail", "b", (1, "accepted"))) < lines.index(("retry", "b", (1, 2)))
    assert lines.index(("callback", "b", (4, "accepted"))) < lines.index(("state", "b", ("executing", "complete")))
    assert all(e["data"]["step"] == names[e["node_id"]] for e in events), events
    (failed,) = [e for e in events if e["kind"] == "callback.fail"]
    assert failed["data"]["report"] == "failure" and failed["data"]["error"] == "disk full", failed
    event_ids = [e["id"] for e in events]
    assert event_ids == sorted(event_ids) and len(set(event_ids)) == len(event_ids), event_ids
    times = [datetime.fromisoformat(e["at"]) for e in events]
    assert all(earlier <= later for earlier, later in pairwise(times)), times
    assert {e["root_id"] for e in events} == {run_id}
    # The refusals say why, in the history as in the answer.
    refusals = [e["data"]["reason"] for e in events if e["data"].get("outcome") == "refused"]
    assert refusals == ["attempt 1 was superseded by attempt 2", "node is already cancelled"], refusals
    (timeout,) = [e for e in events if e["kind"] == "timeout"]
    assert timeout["data"]["timeout_s"] == TIMEOUT_S


async def test_a_refused_connection_is_reported_as_a_failed_call_not_as_accepted(aetr: Server) -> None:
    with socket.socket() as closed:  # bound, never listening: connections to it are refused
        closed.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{closed.getsockname()[1]}/x"
        await aetr.put_step({"name": "nowhere", "kind": "api", "url": url, "retry": {"max_attempts": 1}})
        run_id = await aetr.start("nowhere", {})
        assert (await aetr.wait_run(run_id))["state"] == "error"
    events = await History(aetr, run_id).read()
    (report,) = [e for e in events if e["kind"] == "dispatch"]
    assert report["data"]["report"] == "failure" and "failed" in report["data"]["error"], report
    kinds = [(e["kind"], e["data"].get("to")) for e in events]
    assert kinds.index(("dispatch", None)) < kinds.index(("state", "error")), kinds
    assert {e["data"]["step"] for e in events} == {"nowhere"}, events


async def test_history_is_listed_by_time_whatever_order_it_was_written_in(store: Store) -> None:
    # A held answer to a call is written after events that happened later (here, a cancellation).
    now = datetime.now(UTC)
    async with store.engine.begin() as conn:
        await conn.execute(insert(events_table), [
            {"root_id": "r", "node_id": "r", "at": now, "kind": "cancel", "data": {"from": "executing"}},
            {"root_id": "r", "node_id": "n", "at": now - timedelta(milliseconds=3), "kind": "dispatch",
             "data": {"attempt": 1, "status": 202}},
            {"root_id": "r", "node_id": "r", "at": now, "kind": "state", "data": {"to": "cancelled"}}])
    assert [e["kind"] for e in await store.run_events("r")] == ["dispatch", "cancel", "state"]
