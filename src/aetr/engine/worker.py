"""The outbox worker: claims due work rows under a lease and performs them (step calls, deadlines)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import uuid
from datetime import timedelta

from aetr.domain.runs import Node
from aetr.engine.coordinator import Coordinator, utcnow
from aetr.engine.dispatcher import Dispatcher
from aetr.store import ClaimedWork, Store

log = logging.getLogger("aetr.worker")

STOP_GRACE_S = 5.0  # seconds work in flight may take to finish when the process stops
ERROR_BACKOFF_S = 1.0  # seconds to wait after the database refused a claim, before trying again


class Worker:
    """Claims due work, runs each item as a task (bounded), and sleeps until woken or the next row is due."""

    def __init__(self, store: Store, coordinator: Coordinator, dispatcher: Dispatcher, *, lease_s: float,
                 poll_s: float, max_in_flight: int) -> None:
        self.store = store
        self.coordinator = coordinator
        self.dispatcher = dispatcher
        self.lease_s = lease_s
        self.poll_s = poll_s
        self.max_in_flight = max_in_flight
        self.owner = f"{socket.gethostname()}:{uuid.uuid4().hex[:8]}"
        self._wake = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop_task: asyncio.Task[None] | None = None
        self._stopping = False

    def wake(self) -> None:
        """New work was committed: look for it now rather than at the next poll."""
        self._wake.set()

    def start(self) -> None:
        """Start the claim loop."""
        self._loop_task = asyncio.create_task(self._run(), name="aetr-worker")

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

    async def _run(self) -> None:
        while not self._stopping:
            self._wake.clear()
            free = self.max_in_flight - len(self._tasks)
            claimed: list[ClaimedWork] = []
            if free > 0:
                try:
                    claimed = await self.store.claim_work(self.owner, utcnow(), free, self.lease_s)
                except Exception:  # the database may be briefly unreachable: keep the loop alive
                    log.exception("claiming work failed; retrying in %s s", ERROR_BACKOFF_S)
                    await asyncio.sleep(ERROR_BACKOFF_S)
                    continue
            nodes = await self._nodes_to_call(claimed)
            for item in claimed:
                task = asyncio.create_task(self._perform(item, nodes.get(item.work.node_id)))
                self._tasks.add(task)
                task.add_done_callback(self._done)
            if claimed and len(claimed) == free:
                continue  # there may be more due right now
            await self._sleep(free <= 0)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if len(self._tasks) == self.max_in_flight - 1:
            self._wake.set()  # a slot freed up after we were full

    async def _sleep(self, full: bool) -> None:
        timeout = self.poll_s
        if not full:
            try:
                due = await self.store.next_due()
            except Exception:
                log.exception("reading the next due time failed")
                due = None
            if due is not None:
                timeout = max(0.0, min(self.poll_s, (due - utcnow()).total_seconds()))
        if timeout <= 0:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout)

    async def _nodes_to_call(self, claimed: list[ClaimedWork]) -> dict[str, Node]:
        """The nodes of the claimed calls, read in one query rather than one per call."""
        ids = [c.work.node_id for c in claimed if c.work.kind == "dispatch"]
        if not ids:
            return {}
        try:
            return {n.id: n for n in await self.store.get_nodes(ids)}
        except Exception:  # the calls wait for their lease to expire and are claimed again
            log.exception("reading the nodes of %d claimed calls failed", len(ids))
            return {}

    async def _perform(self, item: ClaimedWork, node: Node | None) -> None:
        try:
            if item.work.kind in ("deadline", "heartbeat"):
                await self.coordinator.deadline_passed(item.work.node_id, item.work.attempt,
                                                       heartbeat=item.work.kind == "heartbeat")
                await self.store.finish_dispatch(item.id, [])
            else:
                await self._with_lease(item, node)
        except asyncio.CancelledError:
            raise
        except Exception:  # one bad item must not stop the others; its lease expires and it is tried again
            log.exception("performing %s for node %s failed", item.work.kind, item.work.node_id)

    async def _with_lease(self, item: ClaimedWork, node: Node | None) -> None:
        """Dispatch, renewing the lease while a slow call is still running so no other process repeats it."""
        task = asyncio.ensure_future(self.dispatcher.dispatch(item, node))
        while True:
            done, _ = await asyncio.wait({task}, timeout=self.lease_s / 2)
            if done:
                task.result()
                return
            await self.store.renew_lease(item.id, self.owner, utcnow() + timedelta(seconds=self.lease_s))
