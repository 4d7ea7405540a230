"""The retention loop: deletes the runs that ended more than AETR_RETENTION_DAYS ago, a small batch at a time.

Every process runs one when the setting is on; on PostgreSQL only the process holding the retention advisory
lock deletes (the others try to take it at each look, and one does once its holder stops), so several
processes never fight over the same rows. Each batch is one short transaction, and the loop pauses between
batches so that running work's transactions go first: PAUSE_S while the process is otherwise idle, BUSY_PAUSE_S
once it has run any event of running work since the batch before (a callback, a run's start, a claim of due
work; not an idle poll). Old runs are deleted at
full pace when nothing runs, and at BATCH_RUNS a second while work runs (2 million a day), whose p99 it then
leaves as it was (docs/performance.md, the purge scenario).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Literal

from aetr.engine import metrics
from aetr.engine.background import Background
from aetr.engine.outage import OUTAGE, is_outage
from aetr.store import Store

log = logging.getLogger("aetr.retention")

TICK_S = 10.0  # seconds between looks for runs due for deletion: a due run goes within a minute, as promised
BATCH_RUNS = 25  # runs deleted per transaction (docs/performance.md: the purge benchmark)
PAUSE_S = 0.04  # seconds between two batches while the process runs no other event
BUSY_PAUSE_S = 1.0  # seconds between two batches while it does
How = Literal["retention", "purge", "api"]
Clock = Callable[[], datetime]


def _now() -> datetime:
    return datetime.now(UTC)


async def purge(store: Store, ended_before: datetime, how: How, batch: int = BATCH_RUNS,
                pause_s: float = PAUSE_S, busy_pause_s: float = BUSY_PAUSE_S) -> int:
    """Delete every run that ended before `ended_before`, `batch` runs per transaction with a pause between
    transactions, `busy_pause_s` long when other events ran since the transaction before; how many it deleted."""
    deleted = 0
    seen = store.work_events
    while True:
        done = await store.retention.delete_ended(ended_before, batch)
        deleted += done
        if done:
            metrics.RUNS_DELETED.labels(how).inc(done)
        if done < batch:
            return deleted
        await asyncio.sleep(pause_s)
        busy, seen = store.work_events != seen, store.work_events  # events ran since the look before
        if busy:  # running work goes first
            await asyncio.sleep(max(0.0, busy_pause_s - pause_s))


class RetentionLoop:
    """Looks every `tick_s` seconds for runs that ended more than `days` ago, and deletes them."""

    def __init__(self, store: Store, days: float, tick_s: float = TICK_S, clock: Clock = _now) -> None:
        self.store = store
        self.keep = timedelta(days=days)
        self.tick_s = tick_s
        self.clock = clock
        self._looking = Background("aetr-retention")

    def start(self) -> None:
        """Start looking."""
        self._looking.start(self._loop)

    async def stop(self) -> None:
        """Stop looking (a batch under way is rolled back) and let another process take the lock."""
        await self._looking.stop()
        await self.store.retention.release_lock()

    async def _loop(self) -> None:
        while True:
            try:
                await self.tick()
            except Exception as exc:  # the next look tries again: what is due stays due
                if is_outage(exc):
                    OUTAGE.failed("deleting runs past their retention", str(exc))
                else:
                    log.exception("deleting runs past their retention failed")
            await asyncio.sleep(self.tick_s)

    async def tick(self) -> int:
        """One look: delete every run due, if this process is the one deleting; how many it deleted."""
        if not await self.store.retention.hold_lock():
            return 0
        return await purge(self.store, self.clock() - self.keep, "retention")
