"""The application's start-up hook: what `aetr serve` uses to tune the process once the engine runs."""

from __future__ import annotations

import asyncio
from pathlib import Path

from starlette.types import Message

from aetr.api.app import create_app
from aetr.config import Settings
from aetr.engine.runtime import Engine

DEADLINE_S = 30.0


async def test_on_started_runs_once_the_engine_has_started_and_before_startup_completes(tmp_path: Path) -> None:
    seen: list[Engine] = []
    app = create_app(Settings(database_url=f"sqlite:///{tmp_path / 'aetr.db'}"),
                     on_started=lambda: seen.append(app.state.engine))
    inbox: asyncio.Queue[Message] = asyncio.Queue()
    outbox: asyncio.Queue[Message] = asyncio.Queue()

    async def send(message: Message) -> None:
        await outbox.put(message)

    lifespan = asyncio.create_task(app({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}},
                                       inbox.get, send))
    await inbox.put({"type": "lifespan.startup"})
    started = await asyncio.wait_for(outbox.get(), DEADLINE_S)
    assert started["type"] == "lifespan.startup.complete", started
    assert seen == [app.state.engine]  # called once, with the engine in place, before startup completed
    # The engine it saw is the one serving: its store answers.
    assert await seen[0].store.list_steps() == []

    await inbox.put({"type": "lifespan.shutdown"})
    stopped = await asyncio.wait_for(outbox.get(), DEADLINE_S)
    assert stopped["type"] == "lifespan.shutdown.complete", stopped
    await asyncio.wait_for(lifespan, DEADLINE_S)
    assert len(seen) == 1
