"""Schedules' storage: their definitions, the due times tickers claim, and the runs those started."""

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import and_, delete, insert, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from aetr.domain.schedules import Schedule, StoredSchedule, next_run
from aetr.store.tables import run_nodes, schedule_runs, schedules, steps

KEPT_RUNS = 20  # claimed due times kept per schedule (the newest): `last_runs` shows a few of them
ClaimStep = Callable[[], AbstractAsyncContextManager[AsyncConnection]]


@dataclass(frozen=True)
class ScheduledRun:
    """A due time a schedule's ticker claimed, and what came of it: the run, the refusal, or (neither) a run
    still to be started."""

    due_at: datetime
    claimed_at: datetime
    run_id: str | None
    error: str | None
    state: str | None  # the run's state; None when it is gone (or not started)
    created_at: datetime | None  # the run's


@dataclass(frozen=True)
class PendingStart:
    """A claimed due time whose run is still to be started."""

    schedule: StoredSchedule
    due_at: datetime


def _stored(row: Any) -> StoredSchedule:
    m = row._mapping
    return StoredSchedule(
        id=m["id"], next_run_at=m["next_run_at"], created_at=m["created_at"], updated_at=m["updated_at"],
        schedule=Schedule(name=m["name"], step=m["step"], cron=m["cron"], timezone=m["timezone"],
                          enabled=bool(m["enabled"]), input=m["input"], notify=m["notify"]))


class ScheduleStore:
    """The schedules' part of the Store (cold paths, through SQLAlchemy Core)."""

    def __init__(self, engine: AsyncEngine, transaction: ClaimStep) -> None:
        self.engine = engine
        self._transaction = transaction

    async def step_exists(self, ref: str) -> bool:
        """Whether a step is named (or has the id) `ref`."""
        async with self.engine.connect() as conn:
            found = await conn.scalar(select(steps.c.id).where(or_(steps.c.name == ref, steps.c.id == ref)))
            return found is not None

    async def put(self, schedule: Schedule, now: datetime) -> tuple[bool, StoredSchedule]:
        """Create or replace a schedule (its id is kept); (created, as stored)."""
        for _ in range(2):  # a create racing another create of the same name becomes its replacement
            try:
                async with self._transaction() as conn:
                    previous = await _get(conn, schedule.name)
                    values = {"step": schedule.step, "cron": schedule.cron, "timezone": schedule.timezone,
                              "enabled": schedule.enabled, "input": schedule.input, "notify": schedule.notify,
                              "next_run_at": next_run(schedule, previous, now), "updated_at": now}
                    if previous is None:
                        await conn.execute(insert(schedules).values(
                            id=str(uuid.uuid4()), name=schedule.name, created_at=now, **values))
                    else:
                        await conn.execute(update(schedules).where(schedules.c.id == previous.id).values(**values))
                    stored = await _get(conn, schedule.name)
                    assert stored is not None
                    return previous is None, stored
            except IntegrityError:
                continue
        raise RuntimeError(f"schedule '{schedule.name}' could not be stored: it kept changing")

    async def get(self, name: str) -> StoredSchedule | None:
        """The schedule named `name`."""
        async with self.engine.connect() as conn:
            return await _get(conn, name)

    async def all(self) -> list[StoredSchedule]:
        """Every schedule, by name."""
        async with self.engine.connect() as conn:
            return [_stored(r) for r in await conn.execute(select(schedules).order_by(schedules.c.name))]

    async def delete(self, name: str) -> bool:
        """Delete a schedule and its record of due times; False when there is none. Its runs are kept."""
        async with self._transaction() as conn:
            schedule_id = await conn.scalar(select(schedules.c.id).where(schedules.c.name == name))
            if schedule_id is None:
                return False
            await conn.execute(delete(schedule_runs).where(schedule_runs.c.schedule_id == schedule_id))
            await conn.execute(delete(schedules).where(schedules.c.id == schedule_id))
            return True

    async def last_runs(self, schedule_ids: Sequence[str], count: int) -> dict[str, list[ScheduledRun]]:
        """Each schedule's newest `count` claimed due times, newest first, with their runs' states."""
        if not schedule_ids:
            return {}
        q = (select(schedule_runs, run_nodes.c.state, run_nodes.c.created_at.label("run_created_at"))
             .select_from(schedule_runs.outerjoin(run_nodes, run_nodes.c.id == schedule_runs.c.run_id))
             .where(schedule_runs.c.schedule_id.in_(list(schedule_ids)))
             .order_by(schedule_runs.c.schedule_id, schedule_runs.c.due_at.desc()))
        found: dict[str, list[ScheduledRun]] = defaultdict(list)
        async with self.engine.connect() as conn:
            for row in await conn.execute(q):
                m = row._mapping
                kept = found[m["schedule_id"]]
                if len(kept) < count:
                    kept.append(ScheduledRun(m["due_at"], m["claimed_at"], m["run_id"], m["error"], m["state"],
                                             m["run_created_at"]))
        return dict(found)

    # ---- firing -----------------------------------------------------------------------------------------

    async def due(self, now: datetime, limit: int) -> list[StoredSchedule]:
        """Schedules due by `now`, the earliest first (an index range on next_run_at)."""
        q = (select(schedules).where(schedules.c.next_run_at <= now).order_by(schedules.c.next_run_at)
             .limit(limit))
        async with self.engine.connect() as conn:
            return [_stored(r) for r in await conn.execute(q)]

    async def claim(self, schedule: StoredSchedule, due_at: datetime, following: datetime, now: datetime) -> bool:
        """Claim a due time: move the schedule's next due time on from the one read (to `following`) and record
        the claim, in one transaction. False when another process (or a change to the schedule) moved it first.
        """
        async with self._transaction() as conn:
            moved = await conn.execute(update(schedules).where(
                schedules.c.id == schedule.id, schedules.c.next_run_at == schedule.next_run_at,
            ).values(next_run_at=following))
            if moved.rowcount != 1:
                return False
            exists = await conn.scalar(select(schedule_runs.c.due_at).where(
                schedule_runs.c.schedule_id == schedule.id, schedule_runs.c.due_at == due_at))
            if exists is not None:  # started already: the schedule was put back to an earlier time since
                return False
            await conn.execute(insert(schedule_runs).values(schedule_id=schedule.id, due_at=due_at, claimed_at=now))
            return True

    async def pending(self, claimed_before: datetime, limit: int) -> list[PendingStart]:
        """Claimed due times whose run is still to be started, claimed by `claimed_before`."""
        q = (select(schedules, schedule_runs.c.due_at.label("claimed_due_at"))
             .select_from(schedule_runs.join(schedules, schedules.c.id == schedule_runs.c.schedule_id))
             .where(schedule_runs.c.run_id.is_(None), schedule_runs.c.error.is_(None),
                    schedule_runs.c.claimed_at <= claimed_before)
             .order_by(schedule_runs.c.claimed_at).limit(limit))
        async with self.engine.connect() as conn:
            return [PendingStart(_stored(r), r._mapping["claimed_due_at"]) for r in await conn.execute(q)]

    async def record(self, schedule_id: str, due_at: datetime, run_id: str | None, error: str | None) -> None:
        """What came of a claimed due time (its run, or why none was started); older records beyond the kept
        number go."""
        async with self._transaction() as conn:
            await conn.execute(update(schedule_runs).where(
                schedule_runs.c.schedule_id == schedule_id, schedule_runs.c.due_at == due_at,
            ).values(run_id=run_id, error=error))
            oldest_kept = await conn.scalar(
                select(schedule_runs.c.due_at).where(schedule_runs.c.schedule_id == schedule_id)
                .order_by(schedule_runs.c.due_at.desc()).offset(KEPT_RUNS - 1).limit(1))
            if oldest_kept is not None:
                await conn.execute(delete(schedule_runs).where(and_(
                    schedule_runs.c.schedule_id == schedule_id, schedule_runs.c.due_at < oldest_kept,
                    or_(schedule_runs.c.run_id.is_not(None), schedule_runs.c.error.is_not(None)))))


async def _get(conn: AsyncConnection, name: str) -> StoredSchedule | None:
    row = (await conn.execute(select(schedules).where(schedules.c.name == name))).first()
    return None if row is None else _stored(row)


__all__ = ["KEPT_RUNS", "PendingStart", "ScheduleStore", "ScheduledRun"]
