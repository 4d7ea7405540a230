"""The engine assembled: store, sandbox, coordinator, dispatcher and worker, started and stopped together."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

from aetr.config import MIB, Settings
from aetr.domain.notify import Backoff
from aetr.engine import tracing
from aetr.engine.admission import StartGate
from aetr.engine.coordinator import Coordinator
from aetr.engine.dispatcher import Dispatcher
from aetr.engine.notifier import Notifier
from aetr.engine.outage import QuietDriverDuringOutage
from aetr.engine.pacing import CallbackWindow
from aetr.engine.retention import RetentionLoop
from aetr.engine.schedules import ScheduleTicker, warped_clock
from aetr.engine.tokens import TokenSigner
from aetr.engine.worker import Worker
from aetr.sandbox import Sandbox, SandboxLimits, ScriptError
from aetr.store import Store, open_store
from aetr.store.migrate import upgrade_engine

SECRET_SETTING = "callback_secret"
LISTEN_WAIT_S = 30.0  # seconds to wait for our own port to accept connections before calling steps anyway
LISTEN_POLL_S = 0.02  # seconds between looks at it

log = logging.getLogger("aetr.engine")


class RunWatch:
    """Wakes a reader of a run when this process commits a change to it.

    Start watching before reading the run, and wait between reads: a commit that lands while a read is under
    way (a reader thread can return a state already out of date) then still wakes the next wait. Waiting
    only after a read had left such a waiter asleep for a whole poll interval after its run ended.
    """

    def __init__(self) -> None:
        self.event = asyncio.Event()

    async def changed(self, seconds: float) -> None:
        """Return once a change was committed since the last return, or after `seconds`."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self.event.wait()
        self.event.clear()


class Engine:
    """Everything a running `aetr serve` process owns."""

    def __init__(self, settings: Settings, store: Store | None = None) -> None:
        self.settings = settings
        self.store = store or open_store(settings.database_url, settings.db_pool_size, settings.sqlite_synchronous)
        self.sandbox = Sandbox(SandboxLimits(time_limit_s=settings.sandbox_time_limit_s,
                                             memory_limit_bytes=int(settings.sandbox_memory_mb * MIB)))
        self.coordinator = Coordinator(self.store, self.sandbox, ScriptError, settings.max_tree_nodes)
        # POST /runs waits here; callbacks never do.
        self.starts = StartGate(settings.max_pending_starts, settings.starts_at_once)
        self.signer: TokenSigner | None = None
        self.dispatcher: Dispatcher | None = None
        self.worker: Worker | None = None
        self.notifier: Notifier | None = None
        self._run_waiters: dict[str, set[asyncio.Event]] = defaultdict(set)
        self._starter: asyncio.Task[None] | None = None
        self.schedules = ScheduleTicker(self.store, self.coordinator, settings.schedule_tick_s)
        if settings.test_schedule_clock:
            self.schedules.clock = warped_clock(settings.test_schedule_clock)
        self.retention = RetentionLoop(self.store, settings.retention_days) if settings.retention_days else None

    async def start(self) -> None:
        """Migrate the schema, load the signing key, start calling steps."""
        driver_log = logging.getLogger("asyncpg.pool")  # it logs a traceback for each connection it cannot restore
        if not any(isinstance(f, QuietDriverDuringOutage) for f in driver_log.filters):
            driver_log.addFilter(QuietDriverDuringOutage())
        await upgrade_engine(self.store.engine)
        tracing.configure()  # once per process, as the OTEL_* variables say
        secret = self.settings.secret or await self.store.setting(SECRET_SETTING, secrets.token_urlsafe(32))
        self.signer = TokenSigner(secret)
        target_ms = self.settings.callback_target_ms
        window = CallbackWindow(target_ms / 1000) if target_ms else None
        self.dispatcher = Dispatcher(self.coordinator, self.signer, self.settings.callback_base,
                                     self.settings.max_in_flight, self.settings.max_payload_bytes,
                                     self.settings.allowed_step_hosts, window=window,
                                     calls_apart=self.settings.step_calls == "process")
        await self.dispatcher.start()
        backoff = Backoff(self.settings.notify_backoff_s, self.settings.notify_max_backoff_s,
                          self.settings.notify_window_s)
        self.notifier = Notifier(self.store, self.settings.callback_base, backoff, self.settings.lease_s,
                                 self.settings.allowed_step_hosts)
        await self.notifier.start()
        self.worker = Worker(self.store, self.coordinator, self.dispatcher, lease_s=self.settings.lease_s,
                             poll_s=self.settings.poll_s, max_in_flight=self.settings.max_in_flight,
                             notifier=self.notifier)
        self.coordinator.on_commit.append(self._notify_waiters)
        self._starter = asyncio.create_task(self._start_worker_once_listening(), name="aetr-worker-start")

    async def _start_worker_once_listening(self) -> None:
        """Start calling steps only once this process can receive their callbacks.

        The application starts before the server binds its port; a step called at once (work left over from
        before a restart) could otherwise call back into a closed port and be lost until its deadline.
        """
        host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(self.settings.host, self.settings.host)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + LISTEN_WAIT_S
        while loop.time() < deadline:
            try:
                _, writer = await asyncio.open_connection(host, self.settings.port)
            except OSError:
                await asyncio.sleep(LISTEN_POLL_S)
                continue
            writer.close()
            await writer.wait_closed()
            break
        else:
            log.warning("port %s:%s not accepting connections after %s s; starting the worker anyway",
                        host, self.settings.port, LISTEN_WAIT_S)
        assert self.worker is not None
        self.coordinator.sink = self.worker  # from now on, commits hand the calls they start to the worker
        self.worker.start()
        self.schedules.start()  # like the worker, only once this process can receive the runs' callbacks
        if self.retention is not None:
            self.retention.start()

    async def stop(self) -> None:
        """Stop the worker, close HTTP and database connections and the sandbox."""
        if self._starter is not None and not self._starter.done():
            self._starter.cancel()
            await asyncio.gather(self._starter, return_exceptions=True)
        await self.schedules.stop()
        if self.retention is not None:
            await self.retention.stop()
        self.coordinator.sink = None
        if self.worker is not None:
            await self.worker.stop()
        await self.coordinator.drain()
        if self.dispatcher is not None:
            await self.dispatcher.close()
        if self.notifier is not None:
            await self.notifier.close()
        await self.store.close()
        self.sandbox.close()
        await asyncio.to_thread(tracing.flush)  # the SDK's exit hook did not export them when `aetr serve` stopped

    @contextlib.contextmanager
    def watching(self, root_id: str) -> Iterator[RunWatch]:
        """Watch this process's commits to a run for as long as the block runs; see RunWatch."""
        watch = RunWatch()
        self._run_waiters[root_id].add(watch.event)
        try:
            yield watch
        finally:
            waiters = self._run_waiters.get(root_id)
            if waiters is not None:
                waiters.discard(watch.event)
                if not waiters:
                    del self._run_waiters[root_id]

    def _notify_waiters(self, root_ids: Any) -> None:
        for root_id in root_ids:
            for event in self._run_waiters.get(root_id, ()):
                event.set()
