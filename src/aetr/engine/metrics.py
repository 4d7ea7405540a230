"""Prometheus metrics of the engine, served at /metrics.

Labels name steps (a run's root step, an attempt's step), outcomes and states: never a run or node id, so a
series stays a series however many runs there are. Each process counts what it did itself: without
prometheus_client's multiprocess mode, a scrape of `aetr serve --workers N` reads one process's numbers.
"""

from __future__ import annotations

import logging
import time
import weakref
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final

from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from aetr.engine.outage import OUTAGE, is_outage

if TYPE_CHECKING:
    from aetr.domain.runs import Plan
    from aetr.store import Store

log = logging.getLogger("aetr.engine")

RUNS_STARTED = Counter("aetr_runs_started", "Runs started, by their step.", ["step"])
RUNS_ENDED = Counter("aetr_runs_ended", "Runs that ended, by their step and final state (complete, error, "
                     "cancelled); a retried run that ends again is counted again.", ["step", "state"])
ATTEMPTS = Counter("aetr_attempts", "Attempts of api steps that ended, by step and outcome (succeeded, failed, "
                   "timed_out, cancelled).", ["step", "outcome"])
ATTEMPT_SECONDS = Histogram(
    "aetr_attempt_duration_seconds", "Seconds from an api step's call to its attempt's outcome, by step and "
    "outcome: the attempts whose call this process made.", ["step", "outcome"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600))
REPORTS = Counter("aetr_step_reports", "Step outcomes reported to the coordinator, by source (callback, "
                  "callback.fail, callback.heartbeat, dispatch, signal) and verdict (accepted, duplicate, "
                  "refused, unknown).", ["source", "outcome"])
CALLS = Counter("aetr_step_calls", "HTTP calls made to api steps, by result.", ["result"])
WAITS_ENDED = Counter("aetr_waits_ended", "Waits ended by their timer or by a signal.", ["how"])
SLOT_WAITS = Counter("aetr_slot_waits", "Attempts of steps with max_concurrency set aside to wait for a slot.")
MAP_BATCHES = Counter("aetr_map_batches", "Batches of a map's items made into nodes after the map's start.")
CONFLICTS = Counter("aetr_optimistic_lock_retries", "Events handled again after losing a race on a node version.")
SCHEDULE_LAG = Histogram("aetr_schedule_lag_seconds", "Seconds from a schedule's due time to the start of its run.",
                         buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300, 3600))
RUNS_DELETED = Counter("aetr_runs_deleted", "Ended runs deleted, by how: retention (AETR_RETENTION_DAYS), purge "
                       "(POST /retention/purge) or api (DELETE /runs/{id}).", ["how"])
NOTIFICATIONS = Counter("aetr_notifications", "Tries to deliver a run's end notification, by outcome "
                        "(delivered, failed: to be tried again, gave_up, superseded).", ["outcome"])
OLDEST_DUE = Gauge("aetr_oldest_due_work_age_seconds", "Seconds the longest-waiting work item (a call, timer, "
                   "deadline, notification...) has been due without any process holding it; 0 when none waits. "
                   "Read from the database at each scrape.")
WINDOW_SIZE = Gauge("aetr_callback_window_size", "Quick step calls this process may have made and not yet had "
                    "the callbacks of (see AETR_CALLBACK_TARGET_MS); it shrinks while callbacks are slow to answer.")
WINDOW_QUEUED = Gauge("aetr_calls_waiting_for_window", "Step calls of this process waiting for a place in the "
                      "callback window now.")
WINDOW_WAITS = Counter("aetr_calls_held_by_window", "Step calls that waited for a place in the callback window "
                       "before they were made.")
CALLS_APART = Counter("aetr_step_calls_apart", "Step calls this process handed to its call process (AETR_STEP_CALLS) "
                      "rather than making them itself.")

MAX_CALLS_TIMED = 100_000  # calls whose start is remembered at most: an outcome handled elsewhere leaves one behind

# Label children, looked up once: prometheus_client's .labels() takes a lock and builds a key on every call.
_started: dict[str, Any] = {}
_ended: dict[tuple[str, str], Any] = {}
_attempts: dict[tuple[str, str], tuple[Any, Any]] = {}
_reports: dict[tuple[str, str], Any] = {}
_calls_by_result: dict[str, Any] = {}
_calls: dict[str, tuple[int, float]] = {}  # node id -> (attempt, time.monotonic() of its call)


def report(source: str, outcome: str) -> None:
    """Count a step's report (a callback, a call's answer, a signal) and the coordinator's verdict on it."""
    child = _reports.get((source, outcome))
    if child is None:
        child = _reports[source, outcome] = REPORTS.labels(source, outcome)
    child.inc()


def call_ended(result: str) -> None:
    """Count a call to a step by its result: "2xx" to "5xx" for an answer, "refused" or "unreachable"."""
    child = _calls_by_result.get(result)
    if child is None:
        child = _calls_by_result[result] = CALLS.labels(result)
    child.inc()


def call_made(node_id: str, attempt: int, at: float) -> None:
    """Remember when this process called an attempt (`at`: time.monotonic()), to time it when it ends."""
    if len(_calls) >= MAX_CALLS_TIMED:
        _calls.pop(next(iter(_calls)))  # the oldest call: its outcome most likely went to another process
    _calls[node_id] = (attempt, at)


def committed(plan: Plan) -> None:
    """Count what an event's commit did, from the history lines it wrote: runs started and ended, attempts ended."""
    for record in plan.events:
        kind = record.kind
        if kind == "state":
            data = record.data
            if record.node_id == record.root_id and data["to"] in ("complete", "error", "cancelled"):
                _run_ended(data["step"], data["to"])
            if data["from"] == "executing" and record.node_id is not None:
                node = plan.nodes.get(record.node_id)
                if node is not None and node.step.kind == "api":
                    _attempt_ended(node.id, node.attempt, data["step"], _attempt_outcome(data))
        elif kind == "retry" and record.node_id is not None:
            data = record.data
            outcome = "timed_out" if data.get("kind") == "timeout" else "failed"
            _attempt_ended(record.node_id, data["attempt"], data["step"], outcome)
        elif kind == "run.started":
            step = record.data["step"]
            child = _started.get(step)
            if child is None:
                child = _started[step] = RUNS_STARTED.labels(step)
            child.inc()


def _attempt_outcome(data: dict[str, Any]) -> str:
    """How an attempt ended, from its node's state change out of executing."""
    to = data["to"]
    if to == "complete":
        return "succeeded"
    if to == "error":
        return "timed_out" if (data.get("error") or {}).get("kind") == "timeout" else "failed"
    return str(to)  # cancelled, skipped


def _run_ended(step: str, state: str) -> None:
    child = _ended.get((step, state))
    if child is None:
        child = _ended[step, state] = RUNS_ENDED.labels(step, state)
    child.inc()


def _attempt_ended(node_id: str, attempt: int, step: str, outcome: str) -> None:
    children = _attempts.get((step, outcome))
    if children is None:
        children = _attempts[step, outcome] = (ATTEMPTS.labels(step, outcome), ATTEMPT_SECONDS.labels(step, outcome))
    children[0].inc()
    call = _calls.pop(node_id, None)
    if call is not None:
        if call[0] == attempt:
            children[1].observe(time.monotonic() - call[1])
        elif call[0] > attempt:  # a later attempt's call, made already: keep it for that attempt
            _calls[node_id] = call


class PoolCollector(Collector):
    """The database connections of the store last scraped: how many each pool may open and how many are in use."""

    def __init__(self) -> None:
        self.store: weakref.ReferenceType[Store] | None = None

    def describe(self) -> Iterable[Any]:
        return [GaugeMetricFamily("aetr_db_pool_size", ""), GaugeMetricFamily("aetr_db_pool_in_use", "")]

    def collect(self) -> Iterator[Any]:
        store = self.store() if self.store is not None else None
        size = GaugeMetricFamily("aetr_db_pool_size", "Database connections a pool of this process may open.",
                                 labels=["pool"])
        in_use = GaugeMetricFamily("aetr_db_pool_in_use", "Database connections of a pool in use now.",
                                   labels=["pool"])
        if store is not None:
            for name, most, used in store.pool_use():
                size.add_metric([name], most)
                in_use.add_metric([name], used)
        yield size
        yield in_use


POOLS: Final = PoolCollector()
REGISTRY.register(POOLS)


async def refresh(store: Store, now: datetime | None = None) -> None:
    """Bring the gauges read from the database up to date, before a scrape: one indexed query."""
    POOLS.store = weakref.ref(store)
    try:
        since = await store.claimable_since()
    except Exception as exc:  # a scrape answers when the database does not: the gauge keeps its last value
        if is_outage(exc):
            OUTAGE.failed("reading the oldest due work for /metrics", type(exc).__name__)
        else:
            log.exception("reading the oldest due work for /metrics failed")
        return
    OUTAGE.reached()
    now = now or datetime.now(UTC)
    OLDEST_DUE.set(max(0.0, (now - since).total_seconds()) if since is not None else 0.0)
