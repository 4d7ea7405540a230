"""Completion notifications: the work a run's end implies when the run was started with a `notify` URL.

A run that ends (complete, error or cancelled) with a notify URL gets one `notify` work row in the
transaction of its end. The row's `node_id` is the notification's own id — stable for that end of that run,
so that a receiver can recognise a delivery made twice — and its `attempt` counts the tries made so far. The
row is never one of the run's nodes' rows, so nothing that drops a node's work (a cancel, a redrive) drops it.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Final

from aetr.domain.runs import Node, Plan, Work
from aetr.domain.urls import redact_userinfo

# The namespace of notification ids (uuid5 of the run's id and the time it ended).
NAMESPACE: Final = uuid.UUID("8a3c1f52-5d0e-4b8e-9a57-0f4e2c6d9b31")
EVENT_TYPES: Final = {"complete": "aetr.run.completed", "error": "aetr.run.failed",
                      "cancelled": "aetr.run.cancelled"}


def notification_id(root: Node) -> str:
    """The id of the notification of the run's current end: the same for every try, new for each end."""
    ended = root.completed_at.isoformat() if root.completed_at is not None else ""
    return str(uuid.uuid5(NAMESPACE, f"{root.id}/{ended}"))


def run_ended(plan: Plan, root: Node) -> None:
    """The run `root` ended in this event: queue its notification, due now, when it has a notify URL."""
    if root.notify is None or root.state not in EVENT_TYPES:
        return
    row = Work("notify", notification_id(root), root.id, 0, plan.now)
    if row not in plan.work:  # a run ended twice in one event (a redrive that ends at once) is told once
        plan.work.append(row)
        # The history says at once that a notification is on its way (the run's page follows it from there).
        plan.event(root, "notify", {"outcome": "queued", "id": row.node_id, "url": redact_userinfo(root.notify)})


@dataclass(frozen=True)
class Backoff:
    """When to try a notification again: exponential from `first_s`, each wait at most `max_s`, for `window_s`
    after the run's end at least."""

    first_s: float = 1.0
    max_s: float = 300.0
    window_s: float = 3600.0

    def wait_s(self, tries: int) -> float:
        """Seconds to wait after the `tries`-th failed try (1 for the first)."""
        return float(min(self.max_s, self.first_s * 2 ** min(tries - 1, 64)))

    def next_try(self, tries: int, ended: datetime, now: datetime) -> datetime | None:
        """When to try again after `tries` failed tries, or None when the window since the end has passed."""
        if now - ended >= timedelta(seconds=self.window_s):
            return None
        return now + timedelta(seconds=self.wait_s(tries))


def event_data(root: Node) -> dict[str, Any]:
    """The `data` of a run's notification: what the run ended with."""
    return {"id": root.id, "step": root.step.name, "state": root.state, "output": root.output,
            "error": root.error, "started_at": _iso(root.started_at), "ended_at": _iso(root.completed_at)}


def _iso(at: datetime | None) -> str | None:
    return None if at is None else at.isoformat().replace("+00:00", "Z")
