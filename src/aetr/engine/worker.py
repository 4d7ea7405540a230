"""The outbox worker: performs work rows under a lease (step calls, deadlines, run-end notifications).

Calls that a commit of this process started arrive through `perform`, already leased in that commit. The
claim loop picks up the rest: calls due later (retries), deadlines, calls beyond the direct limit, and the
work of a process that died (its leases expired). It sleeps until the earliest due row, or until a commit
tells it (`due`) of an earlier one.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import os
import socket
import uuid
from collections.abc import Coroutine
from datetime import datetime, timedelta
from typing import Any

from aetr.engine.coordinator import Coordinator, utcnow
from aetr.engine.dispatcher import Dispatcher
from aetr.engine.notifier import Notifier
from aetr.engine.outage import OUTAGE, is_outage
from aetr.store import ClaimedWork, Store
from aetr.store.sql import Claim, ClaimResult, RenewLease, single

log = logging.getLogger("aetr.worker")

STOP_GRACE_S = 5.0  # seconds work in flight may take to finish when the process stops
ERROR_BACKOFF_S = 1.0  # seconds to wait after the database refused a claim, before trying again


class Worker:
    """Runs each work item as a task; claims due rows up to `max_in_flight` tasks at a time."""

    def __init__(self, store: Store, coordinator: Coordinator, dispatcher: Dispatcher, *, lease_s: float,
                 poll_s: float, max_in_flight: int, notifier: Notifier | None = None) -> None:
        self.store = store
        self.notifier = notifier
        self.coordinator = coordinator
        self.dispatcher = dispatcher
        self.lease_s = lease_s
        self.poll_s = poll_s
        self.max_in_flight = max_in_flight
        self.direct_limit = max_in_flight
        self._refill_at = max_in_flight - max(1, max_in_flight // 4)
        # host:pid:nonce — a process restarted on the same host recognises the leases of a dead predecessor
        self.owner = f"{socket.gethostname()[:40]}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._wake = asyncio.Event()
        self._wake_at: datetime | None = None  # when the sleeping claim loop looks again
        self._tasks: set[asyncio.Task[None]] = set()
        self._waiting: list[tuple[datetime, int, ClaimedWork]] = []  # queued attempts, earliest due first
        self._arrivals = itertools.count()  # ties on due_at keep their claim order
        self._offering = False  # a task is offering slots to _waiting
        self._loop_task: asyncio.Task[None] | None = None
        self._stopping = False
        self._leases = _Leases(self)

    def start(self) -> None:
        """Start the claim loop."""
        self._loop_task = asyncio.create_task(self._run(), name="aetr-worker")

    def perform(self, calls: list[ClaimedWork]) -> None:
        """Make calls this process leased in the commit that started them."""
        if self._stopping:
            return  # their leases expire and whoever runs next makes them
        for item in calls:
            self._spawn(item)

    def room(self) -> int:
        """How many more work items this process may run at once now."""
        return self.max_in_flight - len(self._tasks)

    def due(self, at: datetime) -> None:
        """A commit added work due at `at`: look for it then, if that is earlier than planned."""
        if self._wake_at is None or at < self._wake_at:
            self._wake.set()

    async def stop(self) -> None:
        """Stop claiming, let work in flight finish for a moment, then cancel the rest (its lease expires)."""
        self._stopping = True
        self._wake.set()
        if self._loop_task is not None:
            await asyncio.gather(self._loop_task, return_exceptions=True)
        if self._tasks:
            # Cancelling a task inside a database call can strand its connection: most work is quick, so wait.
            await asyncio.wait(set(self._tasks), timeout=STOP_GRACE_S)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._leases.stop()

    def _spawn(self, item: ClaimedWork) -> None:
        self._spawn_task(self._perform(item))

    def _spawn_task(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _queue_for_slots(self, items: list[ClaimedWork]) -> None:
        """Attempts waiting for a step's slot take them one after another, in the order they became due, whichever
        claim brought them: one task offers them slots, earliest first."""
        for item in items:
            heapq.heappush(self._waiting, (item.work.due_at, next(self._arrivals), item))
        if not self._offering:
            self._offering = True
            self._spawn_task(self._offer_in_order())

    async def _offer_in_order(self) -> None:
        try:
            while self._waiting:
                _, _, item = heapq.heappop(self._waiting)
                await self._perform(item)
        finally:
            self._offering = False

    async def _take_over_the_dead(self) -> None:
        """Release the leases of this host's processes that are gone, so that their calls are made at once.

        A process killed after committing calls but before making them (or in the middle of them) holds their
        leases for AETR_LEASE_S more; a deadline shorter than that used to fail such calls, never made, as
        time-outs. Processes on other hosts, or of an unknown kind, are left to their leases.
        """
        host = self.owner.split(":", 1)[0]
        for owner in await self.store.lease_holders(f"{host}:"):
            parts = owner.split(":")
            if owner == self.owner or len(parts) != 3 or not parts[1].isdigit() or _alive(int(parts[1])):
                continue
            released = await self.store.release_leases(owner)
            if released:
                log.info("took over %d work rows leased to %s, a process of this host that is gone", released,
                         owner)

    async def _run(self) -> None:
        try:
            await self._take_over_the_dead()
        except Exception:  # leases expire on their own: a failure here delays that work, it loses nothing
            log.exception("taking over the work of this host's dead processes failed")
        while not self._stopping:
            self._wake.clear()
            self._wake_at = None  # awake: any commit from now on may have come after the claim's snapshot
            free = self.max_in_flight - len(self._tasks)
            if free <= 0:
                await self._sleep(True, None)  # full: a finishing task wakes us
                continue
            result = ClaimResult([])
            try:
                result = await self.store.run(single(Claim(self.owner, utcnow(), free, self.lease_s)))
            except Exception as exc:  # the database may be briefly unreachable: keep the loop alive
                if is_outage(exc):
                    OUTAGE.failed("claiming work", str(exc))
                else:
                    log.exception("claiming work failed; retrying in %s s", ERROR_BACKOFF_S)
                await asyncio.sleep(ERROR_BACKOFF_S)
                continue
            OUTAGE.reached()
            if result.claimed:
                self.store.ran_work()
            queued = [c for c in result.claimed if c.work.kind == "queued"]
            if queued:
                self._queue_for_slots(queued)
            for item in result.claimed:
                if item.work.kind != "queued":
                    self._spawn(item)
            if result.claimed and len(result.claimed) == free:
                continue  # there may be more due right now
            await self._sleep(False, result.next_due)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if len(self._tasks) == self._refill_at:
            self._wake.set()  # a quarter of the slots freed up since we were full: claim them in one go

    async def _sleep(self, full: bool, due: datetime | None) -> None:
        timeout = self.poll_s
        if not full and due is not None:
            timeout = max(0.0, min(self.poll_s, (due - utcnow()).total_seconds()))
        if timeout <= 0 or self._wake.is_set():
            return
        self._wake_at = utcnow() + timedelta(seconds=timeout)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout)

    async def _perform(self, item: ClaimedWork) -> None:
        try:
            if item.work.kind == "count":
                if await self.coordinator.count_child(item.work.node_id, item.work.attempt, self.owner,
                                                      self.lease_s):
                    await self.coordinator.complete_parent(item.work.node_id)
            elif item.work.kind == "complete":  # a count whose process died before it completed the parent
                await self.coordinator.complete_parent(item.work.node_id)
            elif item.work.kind == "queued":
                await self.coordinator.offer_slot(item.work.node_id, item.work.attempt)
            elif item.work.kind == "grow":
                await self.coordinator.grow_map(item.work.node_id, item.work.attempt)
            elif item.work.kind == "timer":
                await self.coordinator.timer_fired(item.work.node_id, item.work.attempt)
            elif item.work.kind == "notify":
                if self.notifier is not None:  # else its lease expires and a process with a notifier delivers it
                    await self.notifier.deliver(item, self.owner)
            elif item.work.kind in ("deadline", "heartbeat"):
                await self.coordinator.deadline_passed(item.work.node_id, item.work.attempt,
                                                       heartbeat=item.work.kind == "heartbeat")
            else:
                await self._with_lease(item)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # one bad item must not stop the others; its lease expires and it is tried again
            if is_outage(exc):
                OUTAGE.failed(f"performing {item.work.kind}", str(exc))
            else:
                log.exception("performing %s for node %s failed", item.work.kind, item.work.node_id)

    async def _with_lease(self, item: ClaimedWork) -> None:
        """Dispatch, renewing the lease every half lease while the call is still under way, so that no process
        takes the call for one whose maker died and makes it again.

        The call runs in this task, and the worker's one sweep renews the leases (_Leases): a task of its own and
        `asyncio.wait` for every call cost three times as much, for the few calls that outlast half a lease.
        """
        key = self._leases.hold(item)
        try:
            await self.dispatcher.dispatch(item)
        finally:
            self._leases.release(key)

    async def _renew(self, item: ClaimedWork) -> bool:
        """Renew a call's lease for another lease from now; False when that failed (it is tried again)."""
        until = utcnow() + timedelta(seconds=self.lease_s)
        try:
            await self.store.run(single(RenewLease(item.work.node_id, item.work.attempt, self.owner, until)))
        except Exception as exc:  # tried again at a later sweep; if it never succeeds, the lease expires
            if is_outage(exc):
                OUTAGE.failed(f"renewing the lease of a call to node {item.work.node_id}", str(exc))
            else:
                log.exception("renewing the lease of a call to node %s failed", item.work.node_id)
            return False
        return True


class _Leases:
    """The leases of the calls under way, renewed by one timer: each sweep (every eighth of a lease, while any
    call is under way) renews the leases taken or renewed half a lease ago or more, so a lease is renewed with
    three eighths of it left at least. A timer of each call's own, made and cancelled with the call, cost more
    than the call's other bookkeeping (1.7 % of the loop's samples on SQLite) for the few calls that outlast half
    a lease. A renewal that fails is tried again at a later sweep; if none succeeds, the lease expires."""

    __slots__ = ("_held", "_renewing", "_sweep", "_worker")

    def __init__(self, worker: Worker) -> None:
        self._worker = worker
        # By the id of the call's item: its item and when its lease was taken or last renewed (the loop's time).
        self._held: dict[int, tuple[ClaimedWork, float]] = {}
        self._renewing: dict[int, asyncio.Task[None]] = {}  # held: the loop keeps only a weak reference to a task
        self._sweep: asyncio.TimerHandle | None = None

    def hold(self, item: ClaimedWork) -> int:
        """A call starts under the lease its claim took; the key to release it with."""
        loop = asyncio.get_running_loop()
        key = id(item)
        self._held[key] = (item, loop.time())
        if self._sweep is None:
            self._sweep = loop.call_later(self._worker.lease_s / 8, self._renew_due)
        return key

    def release(self, key: int) -> None:
        """The call ended: no more renewals, and none still under way (the process may be stopping)."""
        del self._held[key]
        renewing = self._renewing.pop(key, None)
        if renewing is not None:
            renewing.cancel()

    def stop(self) -> None:
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None

    def _renew_due(self) -> None:
        self._sweep = None
        if not self._held:
            return  # the next call held arms the sweep again
        loop = asyncio.get_running_loop()
        now = loop.time()
        due = now - self._worker.lease_s / 2
        for key, (item, at) in self._held.items():
            if at <= due and key not in self._renewing:
                self._renewing[key] = loop.create_task(self._renew(key, item, now))
        self._sweep = loop.call_later(self._worker.lease_s / 8, self._renew_due)

    async def _renew(self, key: int, item: ClaimedWork, now: float) -> None:
        try:
            renewed = await self._worker._renew(item)
            held = self._held.get(key)
            if renewed and held is not None and held[0] is item:  # still under way: the next renewal counts from now
                self._held[key] = (item, now)
        finally:
            if self._renewing.get(key) is asyncio.current_task():
                del self._renewing[key]


def _alive(pid: int) -> bool:
    """Whether a process with this id runs on this host (for another user's, too)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
