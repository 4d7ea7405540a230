"""Traces of runs and node attempts, exported with OpenTelemetry when it is installed and configured.

Tracing is on when the `aetr[otel]` packages import and the standard OTEL_* variables ask for traces
(`enabled_by`). Off, `TRACER` is None and every hook the engine calls is behind one `is None` check: no span,
context or id is made.

A run may last days and end in another process than the one that started it, so no span object lives as long
as a run. Its start picks the run span's trace id and span id (the caller's `traceparent` gives the trace and
the parent) and stores them on the run's root row (`Node.trace`); the span is exported when the run ends, with
the run's real start and end times, by whichever process commits the end. An attempt's span id is derived from
its node id and attempt number, so the `traceparent` sent with the call names the span that the process which
commits the attempt's outcome exports, whichever process that is.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import time
from collections.abc import Mapping
from contextvars import ContextVar
from datetime import datetime
from typing import TYPE_CHECKING, Any, NamedTuple

from aetr.domain.runs import TERMINAL, Node, Plan

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
    from opentelemetry.trace import Tracer

    from aetr.store import Store

log = logging.getLogger("aetr.tracing")

TRACER: Tracer | None = None  # None: tracing is off
_PROVIDER: TracerProvider | None = None
_IDS: ContextVar[tuple[int, int] | None] = ContextVar("aetr_span_ids", default=None)  # (trace id, span id) to use
_RANDOM = random.Random()
KEEP = 10_000  # runs' contexts and attempts' call times held at most; the oldest are dropped first
_runs: dict[str, RunTrace | None] = {}  # run id → its stored context (None: the run is not traced)
_called: dict[tuple[str, int], int] = {}  # (node id, attempt) → when this process called the step, in ns

# Span attributes, named as AETR's own namespace: OpenTelemetry has no semantic convention for workflow runs.
RUN_ID, NODE_ID, STEP_NAME = "aetr.run.id", "aetr.node.id", "aetr.step.name"
ATTEMPT, STATE = "aetr.attempt", "aetr.state"
RETRYING = "retrying"  # an attempt's state when it failed and another attempt follows


class RunTrace(NamedTuple):
    """A traced run's span context, as stored: its trace, its own span, its parent span (0: none), its flags."""

    trace_id: int
    span_id: int
    parent_id: int
    flags: int

    def encode(self) -> str:
        """The stored form: `<trace id>-<span id>-<parent span id>-<flags>` in hexadecimal, as W3C writes them."""
        return f"{self.trace_id:032x}-{self.span_id:016x}-{self.parent_id:016x}-{self.flags:02x}"

    @staticmethod
    def decode(text: str) -> RunTrace | None:
        """The context from its stored form; None for text that is not one."""
        try:
            trace_id, span_id, parent_id, flags = (int(part, 16) for part in text.split("-"))
        except ValueError:
            return None
        return RunTrace(trace_id, span_id, parent_id, flags)


def enabled_by(environ: Mapping[str, str]) -> bool:
    """Whether the OTEL_* variables ask for traces.

    The SDK itself would export to localhost:4318 with no variable set at all; AETR waits to be asked: an
    exporter named in OTEL_TRACES_EXPORTER (other than `none`), or an OTLP endpoint for traces.
    """
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporters = environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporters:
        return exporters != "none"
    return bool(environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))


def configure(environ: Mapping[str, str] = os.environ) -> bool:
    """Start tracing as the OTEL_* variables say, once per process; whether it is on."""
    if TRACER is not None:
        return True
    if not enabled_by(environ):
        return False
    try:
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
    except ImportError:
        log.warning("the OTEL_* variables ask for traces, but OpenTelemetry is not installed: "
                    "pip install 'aetr[otel]' (runs are not traced)")
        return False
    exporters: list[SpanExporter] = []
    for name in environ.get("OTEL_TRACES_EXPORTER", "otlp").lower().split(","):
        name = name.strip()
        if name == "otlp":
            # The SDK's own variables configure it: OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT, _HEADERS, _TIMEOUT...
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            exporters.append(OTLPSpanExporter())
        elif name == "console":
            exporters.append(ConsoleSpanExporter())
        elif name not in ("", "none"):
            log.warning("OTEL_TRACES_EXPORTER: AETR exports with 'otlp' (over HTTP) or 'console', not %r", name)
    if not exporters:
        return False
    install(*(BatchSpanProcessor(exporter) for exporter in exporters))  # OTEL_BSP_* tune them
    return True


def install(*processors: SpanProcessor) -> TracerProvider:
    """Trace runs into these span processors (a test's in-memory exporter, or the configured ones)."""
    global TRACER, _PROVIDER
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.id_generator import RandomIdGenerator

    class PresetIds(RandomIdGenerator):
        """The SDK's ids, except for a span whose ids were chosen beforehand (see _emit)."""

        def generate_span_id(self) -> int:
            preset = _IDS.get()
            return preset[1] if preset is not None else super().generate_span_id()

        def generate_trace_id(self) -> int:
            preset = _IDS.get()
            return preset[0] if preset is not None else super().generate_trace_id()

    # Not the global provider: AETR's spans go where its OTEL_* variables say, whatever else the process does.
    # OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES and OTEL_TRACES_SAMPLER(_ARG) are read by the SDK here.
    provider = TracerProvider(id_generator=PresetIds())
    for processor in processors:
        provider.add_span_processor(processor)
    uninstall()
    _PROVIDER, TRACER = provider, provider.get_tracer("aetr")
    return provider


def flush() -> None:
    """Export the spans still waiting in the batch processors (the process is stopping)."""
    if _PROVIDER is not None:
        _PROVIDER.force_flush()


def uninstall() -> None:
    """Stop tracing, exporting what is pending."""
    global TRACER, _PROVIDER
    provider, _PROVIDER, TRACER = _PROVIDER, None, None
    _runs.clear()
    _called.clear()
    if provider is not None:
        provider.shutdown()


def new_run(run_id: str, traceparent: str | None) -> str | None:
    """The stored context of a run starting now: the caller's trace when `traceparent` is valid, else a trace
    whose id is the run's id."""
    if _PROVIDER is None:
        return None
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    parent = None
    if traceparent:
        from opentelemetry.trace import get_current_span

        found = get_current_span(TraceContextTextMapPropagator().extract({"traceparent": traceparent}))
        parent = found.get_span_context() if found.get_span_context().is_valid else None
    span_id = _RANDOM.getrandbits(64) or 1
    if parent is not None:
        return RunTrace(parent.trace_id, span_id, parent.span_id, int(parent.trace_flags) & 1).encode()
    trace_id = int(run_id.replace("-", ""), 16)
    from opentelemetry.context import Context

    # An empty context: the run has no parent, whatever span the request's task may carry.
    decision = _PROVIDER.sampler.should_sample(Context(), trace_id, "run").decision
    sampled = decision.is_sampled()  # type: ignore[no-untyped-call]  # the SDK leaves this method unannotated
    return RunTrace(trace_id, span_id, 0, int(sampled)).encode()


def attempt_span_id(node_id: str, attempt: int) -> int:
    """The span id of an attempt: the same in every process, so no process has to be told it."""
    digest = hashlib.blake2b(f"{node_id}/{attempt}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") or 1


async def traceparent(node: Node, store: Store) -> str | None:
    """The `traceparent` of an attempt's call: its span in its run's trace; None for a run that is not traced."""
    run = _runs.get(node.root_id, ...)
    if run is ...:
        try:
            stored = await store.run_trace(node.root_id)
        except Exception as exc:  # the call goes ahead untraced; the next call of the run reads again
            log.warning("the trace context of run %s could not be read (%s): its call is sent untraced",
                        node.root_id, type(exc).__name__)
            return None
        run = _remember(node.root_id, stored)
    if run is None:
        return None
    return f"00-{run.trace_id:032x}-{attempt_span_id(node.id, node.attempt):016x}-{run.flags:02x}"


def called(node: Node) -> None:
    """This process calls the step for the node's attempt now: its span starts here."""
    if len(_called) >= KEEP:
        del _called[next(iter(_called))]
    _called[node.id, node.attempt] = time.time_ns()


def _remember(run_id: str, stored: str | None) -> RunTrace | None:
    run = RunTrace.decode(stored) if stored else None
    if len(_runs) >= KEEP:
        del _runs[next(iter(_runs))]
    _runs[run_id] = run
    return run


def committed(plan: Plan) -> None:
    """Export the spans of the runs and attempts a commit ended, and keep the traced runs' contexts it read."""
    try:
        _committed(plan)
    except Exception:  # tracing never stops the engine
        log.exception("tracing a commit failed")


def _committed(plan: Plan) -> None:
    for run_id in {event.root_id for event in plan.events}:  # the runs this commit touched, not all its nodes
        root = plan.nodes.get(run_id)
        if root is not None and root.trace is not None and run_id not in _runs:
            _remember(run_id, root.trace)
    for event in plan.events:
        if event.kind not in ("state", "retry") or event.node_id is None:
            continue
        node = plan.nodes.get(event.node_id)
        run = _runs.get(event.root_id)
        if node is None or run is None:
            continue
        if event.kind == "retry":
            if node.step.kind == "api":
                _attempt_span(run, node, int(event.data["attempt"]), RETRYING, event.data.get("error"), event.at)
        elif event.data.get("to") in TERMINAL:
            state = str(event.data["to"])
            error = (node.error or {}).get("message") if state == "error" else None
            if node.step.kind == "api" and event.data.get("from") == "executing":
                _attempt_span(run, node, node.attempt, state, error, event.at)
            if node.parent_id is None:
                attributes = {RUN_ID: node.id, STEP_NAME: node.step.name, STATE: state}
                parent = (run.trace_id, run.parent_id) if run.parent_id else None
                _emit(f"run {node.step.name}", (run.trace_id, run.span_id), parent, run.flags, node.created_at,
                      event.at, attributes, error, internal=True)


def _attempt_span(run: RunTrace, node: Node, attempt: int, state: str, error: Any, at: datetime) -> None:
    started = _called.pop((node.id, attempt), None)
    start: datetime | int = started if started is not None else (node.started_at or at)
    attributes = {RUN_ID: node.root_id, NODE_ID: node.id, STEP_NAME: node.step.name, ATTEMPT: attempt,
                  STATE: state}
    _emit(f"call {node.step.name}", (run.trace_id, attempt_span_id(node.id, attempt)), (run.trace_id, run.span_id),
          run.flags, start, at, attributes, str(error) if error is not None and state != "complete" else None,
          internal=False)


def _ns(at: datetime | int) -> int:
    return at if isinstance(at, int) else int(at.timestamp() * 1e9)


def _emit(name: str, ids: tuple[int, int], parent: tuple[int, int] | None, flags: int, start: datetime | int,
          end: datetime, attributes: dict[str, Any], error: str | None, internal: bool) -> None:
    """Export one finished span with the ids chosen for it, under its parent, with its real times."""
    from opentelemetry.context import Context
    from opentelemetry.trace import (
        NonRecordingSpan,
        SpanContext,
        SpanKind,
        Status,
        StatusCode,
        TraceFlags,
        set_span_in_context,
    )

    assert TRACER is not None
    context = Context()  # never the current one: an event's task may carry someone else's span
    if parent is not None:
        remote = SpanContext(parent[0], parent[1], is_remote=True, trace_flags=TraceFlags(flags))
        context = set_span_in_context(NonRecordingSpan(remote), context)
    token = _IDS.set(ids)
    try:
        span = TRACER.start_span(name, context, kind=SpanKind.INTERNAL if internal else SpanKind.CLIENT,
                                 attributes=attributes, start_time=_ns(start))
    finally:
        _IDS.reset(token)
    if error is not None:
        span.set_status(Status(StatusCode.ERROR, error))
    span.end(end_time=max(_ns(end), _ns(start)))
