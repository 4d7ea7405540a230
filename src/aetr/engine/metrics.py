"""Prometheus metrics of the engine, served at /metrics."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

RUNS_STARTED = Counter("aetr_runs_started", "Runs started.")
REPORTS = Counter("aetr_step_reports", "Step outcomes reported to the coordinator, by source and verdict.",
                  ["source", "outcome"])
CALLS = Counter("aetr_step_calls", "HTTP calls made to api steps, by result.", ["result"])
WAITS_ENDED = Counter("aetr_waits_ended", "Waits ended by their timer or by a signal.", ["how"])
SLOT_WAITS = Counter("aetr_slot_waits", "Attempts of steps with max_concurrency set aside to wait for a slot.")
MAP_BATCHES = Counter("aetr_map_batches", "Batches of a map's items made into nodes after the map's start.")
CONFLICTS = Counter("aetr_optimistic_lock_retries", "Events handled again after losing a race on a node version.")
SCHEDULE_LAG = Histogram("aetr_schedule_lag_seconds", "Seconds from a schedule's due time to the start of its run.",
                         buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300, 3600))
NOTIFICATIONS = Counter("aetr_notifications", "Tries to deliver a run's end notification, by outcome "
                        "(delivered, failed: to be tried again, gave_up, superseded).", ["outcome"])
