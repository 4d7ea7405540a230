"""The schedule ticker: starts the runs that schedules make due, each due time once, whichever processes are up.

Every process runs one. Each tick reads the schedules due by now (an index range on `next_run_at`), and for
each claims one due time — the latest one passed, so a schedule missed while no process was up starts one
catch-up run — by moving `next_run_at` on from the value it read and recording the claim, in one transaction:
of several processes looking at once, one claim succeeds. The run then starts under an idempotency key made of
the schedule and the due time, so a claim whose process died before its run started (found by any process a
moment later) starts that run once, and never a second one.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from aetr.domain.schedules import StoredSchedule, firing, run_key
from aetr.engine import metrics
from aetr.engine.background import Background
from aetr.engine.coordinator import Coordinator, utcnow
from aetr.engine.outage import OUTAGE, is_outage
from aetr.store import Store

log = logging.getLogger("aetr.schedules")

TICK_S = 1.0  # seconds between looks for due schedules (AETR_SCHEDULE_TICK_S)
BATCH = 100  # due schedules handled per look; the rest at the next one, at once
PENDING_GRACE_S = 5.0  # seconds a claim's own process has to start its run before any process starts it
Clock = Callable[[], datetime]


def warped_clock(spec: str) -> Clock:
    """For tests only (AETR_TEST_SCHEDULE_CLOCK="EPOCH*RATE"): schedules see time run RATE times faster than the
    wall clock from the Unix time EPOCH on, so that processes started with the same value agree on it and
    minute-by-minute cron expressions come due every few seconds."""
    epoch_text, _, rate_text = spec.partition("*")
    epoch, rate = float(epoch_text), float(rate_text)

    def now() -> datetime:
        wall = datetime.now(UTC).timestamp()
        return datetime.fromtimestamp(epoch + (wall - epoch) * rate, UTC)

    return now


class ScheduleTicker:
    """Looks for due schedules every `tick_s` seconds and starts their runs."""

    def __init__(self, store: Store, coordinator: Coordinator, tick_s: float = TICK_S,
                 clock: Clock = utcnow) -> None:
        self.store = store
        self.coordinator = coordinator
        self.tick_s = tick_s
        self.clock = clock  # tests replace it to move time on
        self._looking = Background("aetr-schedules")
        self._stopped = False

    def start(self) -> None:
        """Start looking (unless stopped already: a test that ticks by hand stops it before the engine starts it)."""
        if not self._stopped:
            self._looking.start(self._loop)

    async def stop(self) -> None:
        """Stop looking, for good (a claim whose run is not started yet is started by the next process to look)."""
        self._stopped = True
        await self._looking.stop()

    async def _loop(self) -> None:
        while True:
            try:
                await self.tick()
            except Exception as exc:  # the next tick tries again: nothing is lost, the claims are in the database
                if is_outage(exc):
                    OUTAGE.failed("looking for due schedules", str(exc))
                else:
                    log.exception("looking for due schedules failed")
            await asyncio.sleep(self.tick_s)

    async def tick(self) -> int:
        """One look: claim each due schedule's due time and start its run, then start the runs of claims whose
        process did not; how many runs this look started."""
        now = self.clock()
        started = 0
        for schedule in await self.store.schedules.due(now, BATCH):
            fire = firing(schedule.schedule.cron, schedule.schedule.timezone, schedule.next_run_at, now)
            if fire is None or not await self.store.schedules.claim(schedule, fire.due_at, fire.following, now):
                continue
            started += await self._guarded(schedule, fire.due_at)
        for pending in await self.store.schedules.pending(now - timedelta(seconds=PENDING_GRACE_S), BATCH):
            started += await self._guarded(pending.schedule, pending.due_at)
        return started

    async def _guarded(self, stored: StoredSchedule, due_at: datetime) -> int:
        """Start a claimed due time's run; a failure leaves the claim to a later look, and the others go on."""
        try:
            return await self._start(stored, due_at)
        except Exception as exc:
            if is_outage(exc):
                raise  # the database is away: the next tick tries again
            log.exception("schedule '%s' could not start its run for %s; it is tried again shortly",
                          stored.schedule.name, due_at.isoformat())
            return 0

    async def _start(self, stored: StoredSchedule, due_at: datetime) -> int:
        """Start the run of a claimed due time (or find the one started for it) and record it."""
        schedule = stored.schedule
        started = await self.coordinator.start_run(schedule.step, schedule.input, run_key(stored.id, due_at),
                                                   notify=schedule.notify)
        if started.run_id and not started.refused:
            await self.store.schedules.record(stored.id, due_at, started.run_id, None)
        else:
            reason = started.refused or f"no step named (or with id) '{schedule.step}'"
            log.warning("schedule '%s' started no run for %s: %s", schedule.name, due_at.isoformat(), reason)
            await self.store.schedules.record(stored.id, due_at, None, reason)
            return 0
        if not started.created:
            return 0
        metrics.SCHEDULE_LAG.observe(max(0.0, (self.clock() - due_at).total_seconds()))
        return 1
