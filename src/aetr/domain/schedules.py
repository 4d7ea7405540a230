"""Schedules: runs started by the clock — a step, a five-field cron expression read in a time zone, an input.

Pure: when a schedule is next due, and which one due time a late look at it starts (the latest one missed,
never a burst). Cron arithmetic is croniter's, done in the schedule's own zone, so a daylight-saving change
moves local times exactly as croniter defines (see docs/behaviour.md, "Schedules").
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError, available_timezones

from croniter import CroniterError, croniter

CRON_FIELDS: Final = 5  # minute hour day-of-month month day-of-week
RUN_KEY_PREFIX: Final = "schedule:"
_TICK: Final = timedelta(microseconds=1)


@dataclass(frozen=True)
class Schedule:
    """A schedule's definition, as PUT stores it."""

    name: str
    step: str  # a step's name (or id)
    cron: str
    timezone: str = "UTC"
    enabled: bool = True
    input: Any = None
    notify: str | None = None


@dataclass(frozen=True)
class StoredSchedule:
    """A stored schedule: its definition, its id (kept when it is replaced) and when it is next due (None while
    it is paused)."""

    id: str
    schedule: Schedule
    next_run_at: datetime | None
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True)
class Firing:
    """The one due time a look at a due schedule starts, and the next due time after it."""

    due_at: datetime
    following: datetime


def zone(name: str) -> ZoneInfo:
    """The IANA time zone `name`; ValueError saying what to write instead when there is none."""
    try:
        # Named zones only: the zone database's directory also holds files that are not IANA names
        # ('posixrules', 'right/…'), which ZoneInfo would load all the same.
        if name not in _zone_names():
            raise ZoneInfoNotFoundError(name)
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise ValueError(f"'{name}' is not a known IANA time zone: write one such as 'UTC' or "
                         "'Europe/Paris'") from None


@functools.cache
def _zone_names() -> frozenset[str]:
    # 'localtime' is the host's own zone where the system lists it: a schedule must mean the same on every host.
    return (frozenset(available_timezones()) - {"localtime"}) | {"UTC"}


def cron_problem(expression: str) -> str | None:
    """Why `expression` is not a usable five-field cron expression, or None when it is."""
    fields = expression.split()
    if len(fields) != CRON_FIELDS:
        return (f"'{expression}' has {len(fields)} fields; write five: minute hour day-of-month month day-of-week "
                "(e.g. '30 2 * * *' for 02:30 every day)")
    try:
        croniter(expression, datetime(2000, 1, 1, tzinfo=UTC)).get_next(datetime)
    except CroniterError as exc:
        message = str(exc)
        if "failed to find next date" in message:
            return f"'{expression}' never comes (no date matches it)"
        return f"'{expression}' is not a valid cron expression: {message}"
    return None


def next_after(cron: str, timezone: str, after: datetime) -> datetime:
    """The first time strictly after `after` that `cron` names in `timezone`, in UTC."""
    found: datetime = croniter(cron, after.astimezone(zone(timezone))).get_next(datetime)
    return found.astimezone(UTC)


def latest_due(cron: str, timezone: str, now: datetime) -> datetime:
    """The last time at or before `now` that `cron` names in `timezone`, in UTC."""
    # croniter looks strictly before its start: start a microsecond later so that `now` itself counts.
    found: datetime = croniter(cron, (now + _TICK).astimezone(zone(timezone))).get_prev(datetime)
    return found.astimezone(UTC)


def firing(cron: str, timezone: str, next_run_at: datetime | None, now: datetime) -> Firing | None:
    """What a look at a schedule at `now` starts: None when it is not due; else one due time — the latest one
    that has passed, so that a schedule missed for a while (every process down) starts one catch-up run, not
    one per missed time — and the next one after it, which is in the future."""
    if next_run_at is None or next_run_at > now:
        return None
    due = max(next_run_at, latest_due(cron, timezone, now))
    return Firing(due, next_after(cron, timezone, now))


def next_run(schedule: Schedule, previous: StoredSchedule | None, now: datetime) -> datetime | None:
    """When a schedule stored at `now` is next due: None while paused; the stored time when a replacement keeps
    it running on the same cron and zone (a due time not yet started is not skipped); else the first time
    after `now` — resuming a paused schedule does not start the times it missed while paused."""
    if not schedule.enabled:
        return None
    if (previous is not None and previous.next_run_at is not None and previous.schedule.cron == schedule.cron
            and previous.schedule.timezone == schedule.timezone):
        return previous.next_run_at
    return next_after(schedule.cron, schedule.timezone, now)


def run_key(schedule_id: str, due_at: datetime) -> str:
    """The idempotency key of the run a schedule starts for a due time: one run per schedule and due time,
    however many processes start it."""
    return f"{RUN_KEY_PREFIX}{schedule_id}:{due_at.astimezone(UTC):%Y-%m-%dT%H:%M:%SZ}"
