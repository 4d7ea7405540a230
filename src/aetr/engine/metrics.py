"""Prometheus metrics of the engine, served at /metrics."""

from __future__ import annotations

from prometheus_client import Counter

RUNS_STARTED = Counter("aetr_runs_started", "Runs started.")
REPORTS = Counter("aetr_step_reports", "Step outcomes reported to the coordinator, by source and verdict.",
                  ["source", "outcome"])
CALLS = Counter("aetr_step_calls", "HTTP calls made to api steps, by result.", ["result"])
CONFLICTS = Counter("aetr_optimistic_lock_retries", "Events handled again after losing a race on a node version.")
