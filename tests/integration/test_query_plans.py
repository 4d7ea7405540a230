"""PostgreSQL's event statements read the rows they are about, however large the tables and runs grow.

Each is planned once per connection, often while the database is nearly empty, and must stay good: the
batched chain query once joined a node to its parent in a way that, planned on a few runs, later started from
every sequential node in the database (8-15 ms per batch in the throughput benchmark, growing with the
table); counting a wide parent's children once walked every count row of the parent for each child counted.
The rows each plan visits, unlike time, do not depend on the machine.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import orjson
import pytest
from sqlalchemy.dialects import postgresql

from aetr.engine.coordinator import Coordinator
from aetr.store import open_store
from aetr.store.migrate import upgrade_engine
from aetr.store.postgres import EVENTS_SESSION
from aetr.store.postgres_sql import COUNT_CHILDREN_PG, ROW_GROUPS, PostgresStatements
from aetr.store.retention import due_query
from aetr.store.statements import next_due_query
from aetr.store.store import claimable_since_query, runs_query
from aetr.testing.engine import KeptCalls, coordinator_without_http
from tests.integration.conftest import TABLES

pytestmark = pytest.mark.postgres

ASKED = 10  # nodes asked about in one batch
ROWS_PER_NODE = 40  # a good plan visits a few rows for each node asked about: the node, its ancestors, a sibling


@pytest.fixture
async def coordinator(pg_url: str) -> AsyncIterator[tuple[Coordinator, KeptCalls]]:
    store = open_store(pg_url)
    await upgrade_engine(store.engine)
    async with store.engine.begin() as conn:
        await conn.exec_driver_sql(f"TRUNCATE {TABLES} RESTART IDENTITY CASCADE")
    try:
        yield await coordinator_without_http(store, "seq", 3)
    finally:
        await store.close()


@pytest.fixture
async def conn(pg_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A connection to the migrated database, its tables emptied, for tests that fill them by SQL."""
    store = open_store(pg_url)
    await upgrade_engine(store.engine)
    connection = await asyncpg.connect(pg_url)
    try:
        await connection.execute(f"TRUNCATE {TABLES} RESTART IDENTITY CASCADE")
        yield connection
    finally:
        await connection.close()
        await store.close()


async def grow(co: Coordinator, calls: KeptCalls, runs: int) -> None:
    """Start `runs` runs and finish their first step."""
    await asyncio.gather(*(co.start_run("seq", {"n": n}, None) for n in range(runs)))
    await calls.succeed(co, {"ok": True})


def rows_visited(plan_json: str) -> int:
    """Rows every node of an EXPLAIN ANALYZE plan produced, over all its loops."""
    def visit(node: dict[str, Any]) -> int:
        own = int(node.get("Actual Rows", 0)) * int(node.get("Actual Loops", 1))
        return own + sum(visit(child) for child in node.get("Plans", ()))

    return visit(orjson.loads(plan_json)[0]["Plan"])


async def chains_visited(conn: asyncpg.Connection, ids: list[str]) -> int:
    arr = "ARRAY[" + ",".join(f"'{i}'" for i in ids) + "]::varchar[]"
    return rows_visited(await conn.fetchval(f"EXPLAIN (ANALYZE, FORMAT JSON) EXECUTE chains({arr}, 1, 'sequential')"))


async def test_the_batched_chain_query_planned_on_a_few_runs_reads_only_the_nodes_asked_about(
        coordinator: tuple[Coordinator, KeptCalls], pg_url: str) -> None:
    co, calls = coordinator
    await grow(co, calls, 5)
    conn = await asyncpg.connect(pg_url, server_settings=EVENTS_SESSION)
    try:
        chains = PostgresStatements().load_chains
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
        # Every node asked about has its chain (and its next sibling); a row shared by several chains is one row.
        assert {start for r in rows for start in r[0]} == set(asked)
        assert len({(r[1], r[2]) for r in rows}) == len(rows)
        visited = await chains_visited(conn, asked)
        assert visited <= ROWS_PER_NODE * ASKED, visited
    finally:
        await conn.close()


async def test_counting_children_of_a_wide_parent_reads_only_the_children_counted(
        coordinator: tuple[Coordinator, KeptCalls], pg_url: str) -> None:
    wide, counted = 5_000, 15  # children waiting to be counted, and counted in one statement
    conn = await asyncpg.connect(pg_url, server_settings=EVENTS_SESSION)
    try:
        # What the children's events leave behind on PostgreSQL: one `count` row each, naming the parent.
        await conn.execute("INSERT INTO run_counters (node_id, done) VALUES ('parent', 0)")
        await conn.execute("INSERT INTO work (kind, node_id, root_id, attempt, due_at)"
                           " SELECT 'count', 'parent', 'root', g, now() FROM generate_series(0, $1 - 1) AS g", wide)
        await conn.execute("ANALYZE work")
        await conn.execute(f"PREPARE count_children(varchar[], integer[], timestamptz, varchar, timestamptz)"
                           f" AS {COUNT_CHILDREN_PG}")
        parents = "ARRAY[" + ",".join(["'parent'"] * counted) + "]::varchar[]"
        visited = rows_visited(await conn.fetchval(
            f"EXPLAIN (ANALYZE, FORMAT JSON) EXECUTE count_children({parents},"
            f" ARRAY{list(range(counted))}::integer[], now(), 'me', now())"))
        assert await conn.fetchval("SELECT done FROM run_counters WHERE node_id = 'parent'") == counted
        assert await conn.fetchval("SELECT count(*) FROM work WHERE kind = 'count'") == wide - counted
        assert visited <= ROWS_PER_NODE * counted, visited
    finally:
        await conn.close()


async def test_a_write_that_counts_children_reads_only_the_parents_it_counts(
        coordinator: tuple[Coordinator, KeptCalls], pg_url: str) -> None:
    parents, counted = 5_000, [f"p{i}" for i in (7, 42, 42, 4_999)]  # three parents, four children
    conn = await asyncpg.connect(pg_url, server_settings=EVENTS_SESSION)
    try:
        # Many counting parents, each with two children to count; the write counts the last two of p42.
        await conn.execute(
            "INSERT INTO run_nodes (id, root_id, position, step_id, step_name, step_kind, step_version, config,"
            " n_children, state, attempt, version, created_at) SELECT 'p' || g, 'p' || g, 0, 's', 'wide',"
            " 'parallel', 1, '{}', 2, 'executing', 0, 1, now() FROM generate_series(0, $1 - 1) AS g", parents)
        await conn.execute("INSERT INTO run_counters (node_id, done) SELECT 'p' || g, 0"
                           " FROM generate_series(0, $1 - 1) AS g", parents)
        await conn.execute("ANALYZE run_nodes")
        await conn.execute("ANALYZE run_counters")
        st = PostgresStatements()
        values: dict[str, Any] = {"drop": None, "beats": None, "expected": 0, "b_due": datetime.now(UTC),
                                  "b_owner": "me", "b_until": datetime.now(UTC) + timedelta(seconds=60)}
        values.update(dict.fromkeys(ROW_GROUPS))
        values["b_"] = [{"node_id": p, "root_id": p} for p in counted]
        plan = await conn.fetchval(f"EXPLAIN (ANALYZE, FORMAT JSON) {st.write_all.text}", *st.write_all.args(values))
        done = dict(await conn.fetch("SELECT node_id, done FROM run_counters WHERE done > 0"))
        assert done == {"p7": 1, "p42": 2, "p4999": 1}
        # Only the parent whose count reached its two children is completed (its row leased to the writer).
        assert await conn.fetch("SELECT node_id, lease_owner FROM work") == [("p42", "me")]
        assert rows_visited(plan) <= ROWS_PER_NODE * len(counted), rows_visited(plan)
    finally:
        await conn.close()


def blocks_read(plan_json: str) -> int:
    """The buffer pages an EXPLAIN (ANALYZE, BUFFERS) plan touched, cached or not."""
    top = orjson.loads(plan_json)[0]["Plan"]
    return int(top.get("Shared Hit Blocks", 0)) + int(top.get("Shared Read Blocks", 0))


async def test_runs_by_the_start_of_their_id_read_a_few_pages_whatever_the_number_of_runs_and_nodes(
        conn: asyncpg.Connection) -> None:
    # One run of 10,000 nodes, whose ids all share its first 8 characters, and 50,000 small runs.
    node = ("INSERT INTO run_nodes (id, root_id, parent_id, position, step_id, step_name, step_kind, step_version,"
            " config, n_children, state, attempt, version, created_at)"
            " SELECT {id}, {root}, {parent}, g, 's', 's', 'api', 1, '{{}}', 0, 'pending', 0, 1,"
            " now() + g * interval '1 ms' FROM generate_series({first}, {last}) AS g")
    big = "'00001000-0000-7000-8000-000000000000'"
    await conn.execute(node.format(id=big, root=big, parent="NULL", first=0, last=0))
    await conn.execute(node.format(id="'00001000-0000-7000-8000-' || lpad(to_hex(g), 12, '0')", root=big,
                                   parent=big, first=1, last=10_000))
    small = "lpad(to_hex(65536 + g), 8, '0') || '-0000-7000-8000-000000000000'"
    await conn.execute(node.format(id=small, root=small, parent="NULL", first=1, last=50_000))
    await conn.execute("ANALYZE run_nodes")
    for prefix, expected in (("00001000", "00001000-0000-7000-8000-000000000000"),
                             ("0001c350", "0001c350-0000-7000-8000-000000000000")):
        query = str(runs_query(None, None, 10, None, prefix).compile(
            dialect=postgresql.dialect(), compile_kwargs={"literal_binds": True}))
        assert [r["id"] for r in await conn.fetch(query)] == [expected]
        plan = await conn.fetchval(f"EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) {query}")
        assert blocks_read(plan) <= 20, plan


async def test_runs_of_a_state_or_step_few_runs_have_read_a_few_pages_whatever_the_number_of_runs(
        conn: asyncpg.Connection) -> None:
    # 50,000 ended runs of one pipeline, then three failed runs of another, each long before the rest.
    root = ("INSERT INTO run_nodes (id, root_id, parent_id, position, step_id, step_name, step_kind, step_version,"
            " config, n_children, state, attempt, version, created_at)"
            " SELECT md5({seed} || g)::uuid, md5({seed} || g)::uuid, NULL, 0, 's', {step}, 'sequential', 1, '{{}}',"
            " 0, {state}, 0, 1, now() - {age} - g * interval '1 ms' FROM generate_series(1, {n}) AS g")
    await conn.execute(root.format(seed="'ok'", step="'nightly'", state="'complete'", age="interval '0 s'",
                                   n=50_000))
    await conn.execute(root.format(seed="'bad'", step="'hourly'", state="'error'", age="interval '1 day'", n=3))
    await conn.execute("ANALYZE run_nodes")
    for state, step, found in (("error", None, 3), (None, "hourly", 3), ("executing", None, 0),
                               ("complete", "hourly", 0)):
        query = str(runs_query(state, step, 10, None).compile(
            dialect=postgresql.dialect(), compile_kwargs={"literal_binds": True}))
        assert len(await conn.fetch(query)) == found
        plan = await conn.fetchval(f"EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) {query}")
        assert blocks_read(plan) <= 20, (state, step, plan)


async def test_the_oldest_due_work_a_scrape_reads_is_a_few_pages_whatever_the_work_waiting(
        conn: asyncpg.Connection) -> None:
    # 60,000 rows no one may claim now (due later, or leased to a living process), and three that wait.
    row = ("INSERT INTO work (kind, node_id, root_id, attempt, due_at, lease_owner, lease_until)"
           " SELECT 'dispatch', 'n' || g, 'r', 1, {due}, {owner}, {until} FROM generate_series(1, {n}) AS g")
    await conn.execute(row.format(due="now() + g * interval '1 s'", owner="NULL", until="NULL", n=30_000))
    await conn.execute(row.format(due="now() - g * interval '1 s'", owner="'p'",
                                  until="now() + g * interval '1 s'", n=30_000))
    await conn.execute(row.format(due="now() - interval '5 min' + g * interval '1 s'", owner="NULL", until="NULL",
                                  n=2))
    await conn.execute(row.format(due="now() - interval '1 h'", owner="'dead'",
                                  until="now() - interval '2 min'", n=1))
    await conn.execute("ANALYZE work")
    query = str(claimable_since_query(datetime.now(UTC)).compile(
        dialect=postgresql.dialect(), compile_kwargs={"literal_binds": True}))
    since = min(t for t in await conn.fetchrow(query) if t is not None)
    waited = await conn.fetchval("SELECT extract(epoch FROM now() - $1::timestamptz)", since)
    assert 299 <= waited < 320  # the first unleased due time: earlier than the dead lease's end
    plan = await conn.fetchval(f"EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) {query}")
    assert blocks_read(plan) <= 20, plan
    # What a worker with nothing to claim asks, to know how long it may sleep: as cheap.
    query = str(next_due_query().compile(dialect=postgresql.dialect(), compile_kwargs={"literal_binds": True}))
    assert min(t for t in await conn.fetchrow(query) if t is not None) == since
    plan = await conn.fetchval(f"EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) {query}")
    assert blocks_read(plan) <= 20, plan


async def test_finding_runs_due_for_deletion_reads_a_few_pages_whatever_the_runs_kept(
        conn: asyncpg.Connection) -> None:
    # 50,000 runs ended within the hour (kept), 20,000 nodes still running, and 15 runs ended a day ago (due),
    # of which 5 still have their end notification being delivered.
    node = ("INSERT INTO run_nodes (id, root_id, parent_id, position, step_id, step_name, step_kind, step_version,"
            " config, n_children, state, attempt, version, created_at, completed_at)"
            " SELECT {id}, {id}, {parent}, 0, 's', 's', 'api', 1, '{{}}', 0, {state}, 0, 1, now(), {ended}"
            " FROM generate_series(1, {n}) AS g")
    await conn.execute(node.format(id="'kept-' || g", parent="NULL", state="'complete'",
                                   ended="now() - g * interval '50 ms'", n=50_000))
    await conn.execute(node.format(id="'running-' || g", parent="'kept-1'", state="'executing'", ended="NULL",
                                   n=20_000))
    await conn.execute(node.format(id="'due-' || g", parent="NULL", state="'error'",
                                   ended="now() - interval '1 day' - g * interval '1 s'", n=15))
    await conn.execute("INSERT INTO work (kind, node_id, root_id, attempt, due_at)"
                       " SELECT 'notify', 'note-' || g, 'due-' || g, 0, now() FROM generate_series(1, 5) AS g")
    await conn.execute("ANALYZE run_nodes")
    await conn.execute("ANALYZE work")
    query = str(due_query().params(ended_before=datetime.now(UTC) - timedelta(hours=2), limit=100)
                .compile(dialect=postgresql.dialect(), compile_kwargs={"literal_binds": True}))
    assert sorted(r["id"] for r in await conn.fetch(query)) == sorted(f"due-{g}" for g in range(6, 16))
    plan = await conn.fetchval(f"EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) {query}")
    assert blocks_read(plan) <= 40, plan
    assert "ix_run_nodes_ended" in plan, plan
