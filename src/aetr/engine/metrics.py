"""Prometheus metrics of the engine, served at /metrics."""

from __future__ import annotations

from prometheus_client import Counter

RUNS_STARTED = Counter("aetr_runs_started", "Runs started.")
REPORTS = Counter("aetr_step_reports", "Step outcomes reported to the coordinator, by source and verdict.",
                  ["source", "outcome"])
CALLS = Counter("aetr_step_calls", "HTTP calls made to api steps, by result.", ["result"])
WAITS_ENDED = Counter("aetr_waits_ended", "Waits ended by their timer or by a signal.", ["how"])
SLOT_WAITS = Counter("aetr_slot_waits", "Attempts of steps with max_concurrency set aside to wait for a slot.")
MAP_BATCHES = Counter("aetr_map_batches", "Batches of a map's items made into nodes after the map's start.")
CONFLICTS = Counter("aetr_optimistic_lock_retries", "Events handled again after losing a race on a node version.")
NOTIFICATIONS = Counter("aetr_notifications", "Tries to deliver a run's end notification, by outcome "
                        "(delivered, failed: to be tried again, gave_up, superseded).", ["outcome"])
