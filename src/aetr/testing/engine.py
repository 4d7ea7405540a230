"""The coordinator driven without HTTP: the calls its commits start are kept in memory, to be answered by hand.

For measuring the engine alone (benchmarks/engine_only.py) and for filling a database with runs in tests.
"""

from __future__ import annotations

import asyncio
from datetime import datetime
from typing import Any

from pydantic import TypeAdapter

from aetr.api.schemas import StepIn, flatten
from aetr.engine.coordinator import Coordinator, utcnow
from aetr.sandbox import ScriptError
from aetr.store import ClaimedWork, Store

UNREACHABLE = "http://127.0.0.1:9/step"  # never called: the calls are kept


class KeptCalls:
    """Where the coordinator hands the calls its commits start: kept, not made."""

    owner, lease_s, direct_limit = "no-http", 60.0, 100_000

    def __init__(self) -> None:
        self.calls: list[ClaimedWork] = []

    def perform(self, calls: list[ClaimedWork]) -> None:
        self.calls.extend(calls)

    def room(self) -> int:
        return self.direct_limit

    def due(self, at: datetime) -> None:
        pass

    async def succeed(self, coordinator: Coordinator, output: Any) -> int:
        """Report every kept call's step as succeeded with `output`, as its callback would; how many there were."""
        calls, self.calls = self.calls, []
        await asyncio.gather(*(coordinator.step_succeeded(c.work.node_id, c.work.attempt, output, "callback")
                               for c in calls))
        return len(calls)


async def coordinator_without_http(store: Store, sequence: str, steps: int) -> tuple[Coordinator, KeptCalls]:
    """A coordinator on `store` (migrated) whose calls are kept, and a sequence named `sequence` of `steps` api
    steps to start. No mapper runs, so there is no sandbox."""
    spec = {"name": sequence, "kind": "sequential", "children": [
        {"step": {"name": f"{sequence}-{i}", "kind": "api", "url": UNREACHABLE}} for i in range(steps)]}
    await store.put_steps(flatten(TypeAdapter(StepIn).validate_python(spec)), None, utcnow())
    kept = KeptCalls()
    coordinator = Coordinator(store, None, ScriptError)  # type: ignore[arg-type]
    coordinator.sink = kept
    return coordinator, kept
