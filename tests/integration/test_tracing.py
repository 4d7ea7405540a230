"""Traces over real HTTP: a span per run and per attempt, the caller's trace in, the attempt's span out."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from types import SimpleNamespace
from typing import Any, cast

import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from aetr.domain.runs import Node
from aetr.engine import tracing
from aetr.testing import StepService, callback, never, sequence, status, sync
from tests.integration.conftest import Server, running_server

CALLER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """Tracing on for the test, into memory."""
    exporter = InMemorySpanExporter()
    tracing.install(SimpleSpanProcessor(exporter))
    try:
        yield exporter
    finally:
        tracing.uninstall()


@pytest.fixture
async def traced(database_url: str, spans: InMemorySpanExporter) -> AsyncIterator[Server]:
    """A server started with tracing on."""
    async with running_server(database_url) as server:
        yield server


def api(svc: StepService, name: str, **kw: Any) -> dict[str, Any]:
    return {"name": name, "kind": "api", "url": svc.url(f"/{name}"), **kw}


async def finished(exporter: InMemorySpanExporter, n: int, timeout: float = 5.0) -> list[ReadableSpan]:  # noqa: ASYNC109
    """The spans exported once there are `n`; fails the test if there are not within `timeout` seconds."""
    deadline = asyncio.get_running_loop().time() + timeout
    while len(exporter.get_finished_spans()) < n:
        assert asyncio.get_running_loop().time() < deadline, [s.name for s in exporter.get_finished_spans()]
        await asyncio.sleep(0.01)  # the exporter has no event to wait on: look again until the deadline
    return list(exporter.get_finished_spans())


def run_span(spans: list[ReadableSpan]) -> ReadableSpan:
    (found,) = [s for s in spans if s.attributes is not None and tracing.NODE_ID not in s.attributes]
    return found


def attempt_spans(spans: list[ReadableSpan]) -> list[ReadableSpan]:
    return sorted((s for s in spans if s.attributes is not None and tracing.NODE_ID in s.attributes),
                  key=lambda s: s.start_time or 0)


def sent(call_headers: Any) -> tuple[int, int]:
    """(trace id, span id) of the `traceparent` a step received."""
    _, trace_id, span_id, _ = call_headers["traceparent"].split("-")
    return int(trace_id, 16), int(span_id, 16)


async def test_a_sequence_of_two_calls_gives_a_run_span_and_an_attempt_span_per_call_in_one_trace(
        traced: Server, steps_service: StepService, spans: InMemorySpanExporter) -> None:
    steps_service.route("/first", callback(lambda x: {"n": x["n"] + 1}))
    steps_service.route("/second", sync(lambda x: {"n": x["n"] * 10}))
    await traced.put_step({"name": "pair", "kind": "sequential", "children": [
        {"step": api(steps_service, "first")}, {"step": api(steps_service, "second", mode="sync")}]})
    run_id = await traced.start("pair", {"n": 1})
    run = await traced.wait_run(run_id)
    assert run["state"] == "complete" and run["output"] == {"n": 20}

    exported = await finished(spans, 3)
    assert len(exported) == 3
    whole, calls = run_span(exported), attempt_spans(exported)
    assert whole.name == "run pair" and whole.parent is None and whole.kind is SpanKind.INTERNAL
    assert dict(whole.attributes or {}) == {"aetr.run.id": run_id, "aetr.step.name": "pair", "aetr.state": "complete"}
    assert whole.context is not None and whole.context.trace_id == int(run_id.replace("-", ""), 16)
    nodes = {child["step"]["name"]: child["id"] for child in run["children"]}
    assert [dict(s.attributes or {}) for s in calls] == [
        {"aetr.run.id": run_id, "aetr.node.id": nodes[name], "aetr.step.name": name, "aetr.attempt": 1,
         "aetr.state": "complete"} for name in ("first", "second")]
    for span, path in zip(calls, ("/first", "/second"), strict=True):
        assert span.kind is SpanKind.CLIENT and span.name == f"call {path[1:]}"
        assert span.context is not None and span.parent is not None
        assert span.context.trace_id == whole.context.trace_id and span.parent.span_id == whole.context.span_id
        (call,) = steps_service.calls(path)
        # The step's own spans, children of what it received, join the run's trace under its attempt.
        assert sent(call.headers) == (span.context.trace_id, span.context.span_id)
        assert whole.start_time is not None and span.start_time is not None and span.end_time is not None
        assert whole.end_time is not None and whole.start_time <= span.start_time <= span.end_time <= whole.end_time


@pytest.mark.parametrize("route", ["fast path", "with an Idempotency-Key"])
async def test_a_traceparent_on_post_runs_makes_the_run_span_its_child(
        traced: Server, steps_service: StepService, spans: InMemorySpanExporter, route: str) -> None:
    steps_service.route("/one", sync(lambda x: x))
    await traced.put_step(api(steps_service, "one", mode="sync"))
    headers = {"traceparent": f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"}
    if route != "fast path":
        headers["Idempotency-Key"] = "k-1"
    status_, body = await traced.call("POST", "/api/v1/runs", {"step": "one", "input": 5}, headers=headers)
    assert status_ == 201, body
    await traced.wait_run(body["id"])

    exported = await finished(spans, 2)
    whole, (attempt,) = run_span(exported), attempt_spans(exported)
    assert whole.parent is not None and whole.parent.is_remote
    assert (whole.parent.trace_id, whole.parent.span_id) == (int(CALLER_TRACE, 16), int(CALLER_SPAN, 16))
    assert attempt.context is not None and attempt.context.trace_id == int(CALLER_TRACE, 16)
    (call,) = steps_service.calls("/one")
    assert sent(call.headers) == (int(CALLER_TRACE, 16), attempt.context.span_id)


async def test_a_malformed_traceparent_starts_a_trace_of_the_runs_own(
        traced: Server, steps_service: StepService, spans: InMemorySpanExporter) -> None:
    steps_service.route("/one", sync(lambda x: x))
    await traced.put_step(api(steps_service, "one", mode="sync"))
    status_, body = await traced.call("POST", "/api/v1/runs", {"step": "one"},
                                      headers={"traceparent": f"00-{CALLER_TRACE}-not-a-span-01"})
    assert status_ == 201, body
    await traced.wait_run(body["id"])
    whole = run_span(await finished(spans, 2))
    assert whole.parent is None and whole.context is not None
    assert whole.context.trace_id == int(body["id"].replace("-", ""), 16)


async def test_a_retried_attempt_gives_a_span_per_attempt(
        traced: Server, steps_service: StepService, spans: InMemorySpanExporter) -> None:
    steps_service.route("/flaky", sequence(status(503), sync(lambda x: {"ok": True})))
    await traced.put_step(api(steps_service, "flaky", mode="sync", retry={"max_attempts": 3, "backoff_s": 0.01}))
    run = await traced.wait_run(await traced.start("flaky"))
    assert run["state"] == "complete" and run["attempt"] == 2

    exported = await finished(spans, 3)
    first, second = attempt_spans(exported)
    assert [(s.attributes or {}).get("aetr.attempt") for s in (first, second)] == [1, 2]
    assert [(s.attributes or {}).get("aetr.state") for s in (first, second)] == ["retrying", "complete"]
    assert not first.status.is_ok and "503" in (first.status.description or "")
    calls = steps_service.calls("/flaky")
    assert [sent(c.headers)[1] for c in calls] == [s.context.span_id for s in (first, second) if s.context]


async def test_a_run_ended_by_a_process_that_did_not_start_it_keeps_its_trace(
        traced: Server, steps_service: StepService, spans: InMemorySpanExporter) -> None:
    steps_service.route("/mute", never())
    await traced.put_step(api(steps_service, "mute"))
    run_id = await traced.start("mute")
    (call,) = await steps_service.wait_for_calls("/mute", 1)
    tracing._runs.clear()  # what this process knew of the run: another process knows only the database
    tracing._called.clear()
    # A call made now by a process that never saw the run names the same attempt span, read from the database.
    attempt = cast(Node, SimpleNamespace(id=run_id, root_id=run_id, attempt=1))
    assert await tracing.traceparent(attempt, traced.engine.store) == call.headers["traceparent"]
    status_, _ = await traced.call("POST", f"/api/v1/runs/{run_id}/cancel")
    assert status_ == 200
    exported = await finished(spans, 2)
    whole, (span,) = run_span(exported), attempt_spans(exported)
    assert (whole.attributes or {})["aetr.state"] == "cancelled"
    assert (span.attributes or {})["aetr.state"] == "cancelled"
    assert span.context is not None and whole.context is not None
    assert sent(call.headers) == (whole.context.trace_id, span.context.span_id)


async def test_without_tracing_nothing_is_stored_and_the_call_names_the_run_as_its_trace(
        database_url: str, steps_service: StepService) -> None:
    assert tracing.TRACER is None
    steps_service.route("/one", sync(lambda x: x))
    async with running_server(database_url) as server:
        await server.put_step(api(steps_service, "one", mode="sync"))
        run_id = await server.start("one")
        await server.wait_run(run_id)
        assert await server.engine.store.run_trace(run_id) is None
    (call,) = steps_service.calls("/one")
    assert sent(call.headers)[0] == int(run_id.replace("-", ""), 16)


async def test_a_run_the_sampler_leaves_out_exports_nothing_and_tells_its_steps_so(
        database_url: str, steps_service: StepService, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "always_off")  # read by the SDK as the provider is made
    exporter = InMemorySpanExporter()
    tracing.install(SimpleSpanProcessor(exporter))
    try:
        steps_service.route("/one", sync(lambda x: x))
        async with running_server(database_url) as server:
            await server.put_step(api(steps_service, "one", mode="sync"))
            await server.wait_run(await server.start("one"))
    finally:
        tracing.uninstall()
    (call,) = steps_service.calls("/one")
    assert call.headers["traceparent"].endswith("-00")  # not sampled: the step's own spans need not be kept
    assert exporter.get_finished_spans() == ()
