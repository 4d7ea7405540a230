"""The engine assembled: store, sandbox, coordinator, dispatcher and worker, started and stopped together."""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections import defaultdict
from typing import Any

from aetr.config import MIB, Settings
from aetr.engine.coordinator import Coordinator
from aetr.engine.dispatcher import Dispatcher
from aetr.engine.tokens import TokenSigner
from aetr.engine.worker import Worker
from aetr.sandbox import Sandbox, SandboxLimits, ScriptError
from aetr.store import Store, open_store
from aetr.store.migrate import upgrade_engine

SECRET_SETTING = "callback_secret"
LISTEN_WAIT_S = 30.0  # seconds to wait for our own port to accept connections before calling steps anyway
LISTEN_POLL_S = 0.02  # seconds between looks at it

log = logging.getLogger("aetr.engine")


class Engine:
    """Everything a running `aetr serve` process owns."""

    def __init__(self, settings: Settings, store: Store | None = None) -> None:
        self.settings = settings
        self.store = store or open_store(settings.database_url, settings.db_pool_size)
        self.sandbox = Sandbox(SandboxLimits(time_limit_s=settings.sandbox_time_limit_s,
                                             memory_limit_bytes=int(settings.sandbox_memory_mb * MIB)))
        self.coordinator = Coordinator(self.store, self.sandbox, ScriptError, settings.max_tree_nodes)
        self.signer: TokenSigner | None = None
        self.dispatcher: Dispatcher | None = None
        self.worker: Worker | None = None
        self._run_waiters: dict[str, set[asyncio.Event]] = defaultdict(set)
        self._starter: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Migrate the schema, load the signing key, start calling steps."""
        await upgrade_engine(self.store.engine)
        secret = self.settings.secret or await self.store.setting(SECRET_SETTING, secrets.token_urlsafe(32))
        self.signer = TokenSigner(secret)
        self.dispatcher = Dispatcher(self.coordinator, self.signer, self.settings.callback_base,
                                     self.settings.max_in_flight)
        await self.dispatcher.start()
        self.worker = Worker(self.store, self.coordinator, self.dispatcher, lease_s=self.settings.lease_s,
                             poll_s=self.settings.poll_s, max_in_flight=self.settings.max_in_flight)
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

    async def stop(self) -> None:
        """Stop the worker, close HTTP and database connections and the sandbox."""
        if self._starter is not None and not self._starter.done():
            self._starter.cancel()
            await asyncio.gather(self._starter, return_exceptions=True)
        self.coordinator.sink = None
        if self.worker is not None:
            await self.worker.stop()
        await self.coordinator.drain()
        if self.dispatcher is not None:
            await self.dispatcher.close()
        await self.store.close()
        self.sandbox.close()

    async def wait_for_change(self, root_id: str, seconds: float) -> None:
        """Return when this process commits a change to the run, or after `seconds`."""
        event = asyncio.Event()
        self._run_waiters[root_id].add(event)
        try:
            async with asyncio.timeout(seconds):
                await event.wait()
        except TimeoutError:
            pass
        finally:
            waiters = self._run_waiters.get(root_id)
            if waiters is not None:
                waiters.discard(event)
                if not waiters:
                    del self._run_waiters[root_id]

    def _notify_waiters(self, root_ids: Any) -> None:
        for root_id in root_ids:
            for event in self._run_waiters.get(root_id, ()):
                event.set()
