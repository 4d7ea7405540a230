"""PostgreSQL plans each event statement once per connection, often while the database is nearly empty.

Such a plan must stay good as the tables grow: the batched chain query once joined a node to its parent in a
way that, planned on a few runs, later started from every sequential node in the database — 8-15 ms per batch
in the throughput benchmark, growing with the table. Buffers read, unlike time, do not depend on the machine.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import orjson
import pytest
from pydantic import TypeAdapter

from aetr.api.schemas import StepIn, flatten
from aetr.engine.coordinator import Coordinator, utcnow
from aetr.sandbox import ScriptError
from aetr.store import ClaimedWork, open_store
from aetr.store.migrate import upgrade_engine
from aetr.store.postgres import EVENTS_SESSION
from aetr.store.sql import Statements
from tests.integration.conftest import TABLES

pytestmark = pytest.mark.postgres

ASKED = 10  # nodes asked about in one batch
BUFFERS_PER_NODE = 40  # a good plan reads a few index and heap pages per node and ancestor


class Calls:
    """Where the coordinator hands the calls it starts: kept, so the test can answer them."""

    owner, lease_s, direct_limit = "test", 60.0, 10_000

    def __init__(self) -> None:
        self.calls: list[ClaimedWork] = []

    def perform(self, calls: list[ClaimedWork]) -> None:
        self.calls.extend(calls)

    def due(self, at: Any) -> None:
        pass


@pytest.fixture
async def coordinator(pg_url: str) -> AsyncIterator[tuple[Coordinator, Calls]]:
    store = open_store(pg_url)
    await upgrade_engine(store.engine)
    async with store.engine.begin() as conn:
        await conn.exec_driver_sql(f"TRUNCATE {TABLES} RESTART IDENTITY CASCADE")
    spec = {"name": "seq", "kind": "sequential", "children": [
        {"step": {"name": f"s{i}", "kind": "api", "url": "http://127.0.0.1:9/step"}} for i in range(3)]}
    await store.put_steps(flatten(TypeAdapter(StepIn).validate_python(spec)), None, utcnow())
    calls = Calls()
    co = Coordinator(store, None, ScriptError)  # type: ignore[arg-type]  # no mapper: no sandbox
    co.sink = calls
    try:
        yield co, calls
    finally:
        await store.close()


async def grow(co: Coordinator, calls: Calls, runs: int) -> None:
    """Start `runs` runs and finish their first step."""
    await asyncio.gather(*(co.start_run("seq", {"n": n}, None) for n in range(runs)))
    started, calls.calls = calls.calls, []
    await asyncio.gather(*(co.step_succeeded(c.work.node_id, c.work.attempt, {"ok": True}, "callback")
                           for c in started))


async def buffers_read(conn: asyncpg.Connection, ids: list[str]) -> int:
    arr = "ARRAY[" + ",".join(f"'{i}'" for i in ids) + "]::varchar[]"
    text = await conn.fetchval(f"EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) EXECUTE chains({arr}, 1, 'sequential')")
    top = orjson.loads(text)[0]["Plan"]
    return int(top["Shared Hit Blocks"]) + int(top["Shared Read Blocks"])


async def test_the_batched_chain_query_planned_on_a_few_runs_reads_only_the_nodes_asked_about(
        coordinator: tuple[Coordinator, Calls], pg_url: str) -> None:
    co, calls = coordinator
    await grow(co, calls, 5)
    conn = await asyncpg.connect(pg_url, server_settings=EVENTS_SESSION)
    try:
        chains = Statements("postgresql").load_chains
        assert chains is not None
        await conn.execute(f"PREPARE chains(varchar[], integer, varchar) AS {chains.text}")
        ids = [r[0] for r in await conn.fetch("SELECT id FROM run_nodes WHERE parent_id IS NOT NULL LIMIT $1", ASKED)]
        await conn.fetch(f"EXECUTE chains(ARRAY{ids}::varchar[], 1, 'sequential')")  # the generic plan, made now
        await grow(co, calls, 400)
        asked = [r[0] for r in await conn.fetch(
            "SELECT id FROM run_nodes WHERE parent_id IS NOT NULL AND state = 'executing' ORDER BY id DESC LIMIT $1",
            ASKED)]
        assert len(asked) == ASKED
        rows = await conn.fetch(f"EXECUTE chains(ARRAY{asked}::varchar[], 1, 'sequential')")
        assert {r[0] for r in rows} == set(asked)  # every node asked about has its chain (and its next sibling)
        read = await buffers_read(conn, asked)
        assert read <= BUFFERS_PER_NODE * ASKED
    finally:
        await conn.close()
