"""Siblings finishing at the same moment: no lost update, and retries stay proportional to the children."""

from __future__ import annotations

import asyncio

from aetr.testing import StepService, never
from tests.integration.conftest import Server

CHILDREN = 1000
CLIENTS = 100


async def test_simultaneous_sibling_callbacks_lose_nothing(aetr: Server, steps_service: StepService) -> None:
    steps_service.route("/leaf", never())
    await aetr.put_step({"name": "leaf", "kind": "api", "url": steps_service.url("/leaf")})
    await aetr.put_step({"name": "wide", "kind": "parallel",
                         "children": [{"step": "leaf", "mapper": "(x, ctx) => ctx.index"}] * CHILDREN})
    run_id = await aetr.start("wide")
    calls = await steps_service.wait_for_calls("/leaf", CHILDREN, timeout=60)
    conflicts_before = aetr.engine.coordinator.conflicts
    queue: asyncio.Queue[tuple[str, int]] = asyncio.Queue()
    for call in calls:
        queue.put_nowait((call.headers["AETR-Callback"], call.json * 10))
    statuses: list[int] = []

    async def client() -> None:
        while not queue.empty():
            url, value = queue.get_nowait()
            async with aetr.http.post(url, json=value) as resp:
                statuses.append(resp.status)

    await asyncio.gather(*(client() for _ in range(CLIENTS)))
    run = await aetr.wait_run(run_id)
    assert statuses == [200] * CHILDREN
    assert run["state"] == "complete"
    assert run["output"] == [i * 10 for i in range(CHILDREN)]
    retries = aetr.engine.coordinator.conflicts - conflicts_before
    print(f"optimistic-lock retries for {CHILDREN} simultaneous sibling callbacks: {retries}")
    assert retries <= CHILDREN  # proportional to the children at worst, never their square
