"""The events' statements are planned well whatever PostgreSQL knows of the tables' size.

The events' sessions plan each statement once, generically (EVENTS_SESSION), and the run tables' statistics
are stale whenever a burst has just filled them (the work table is a queue). Each prebuilt statement is planned
here as those sessions plan it, on tables whose statistics say they are empty, and must read the run tables by
index, with no plan the sessions disabled (a sequential or bitmap scan, a hash or merge join: a disabled node
costs 10^10) — on a big table such a plan reads every row, as the claim of a step's longest-waiting attempt
once did: 10 ms a claim with 5,000 attempts waiting, 0.1 ms read in due order.
"""

from __future__ import annotations

import json
import re
from typing import Any

import asyncpg
import pytest

from aetr.store import open_store
from aetr.store.migrate import upgrade_engine
from aetr.store.operations import Sql
from aetr.store.postgres import EVENTS_SESSION
from aetr.store.postgres_sql import PostgresStatements

pytestmark = pytest.mark.postgres

DISABLED_COST = 1e9  # a plan holding a node the session disabled costs at least 10^10
PARAMETER = re.compile(r"\$(\d+)")


def _nodes(plan: dict[str, Any]) -> list[dict[str, Any]]:
    return [plan, *(n for child in plan.get("Plans", ()) for n in _nodes(child))]


async def _plan(conn: asyncpg.Connection, name: str, sql: Sql) -> dict[str, Any]:
    await conn.execute(f"PREPARE {name} AS {sql.text}")
    try:
        count = max((int(n) for n in PARAMETER.findall(sql.text)), default=0)
        args = ", ".join(["NULL"] * count)
        (row,) = await conn.fetch(f"EXPLAIN (FORMAT JSON) EXECUTE {name}{f'({args})' if args else ''}")
        plan: dict[str, Any] = json.loads(row[0])[0]["Plan"]
        return plan
    finally:
        await conn.execute(f"DEALLOCATE {name}")


async def test_every_event_statement_reads_the_run_tables_by_index_on_tables_thought_empty(pg_url: str) -> None:
    store = open_store(pg_url)
    try:
        await upgrade_engine(store.engine)
    finally:
        await store.close()
    dsn = pg_url.replace("postgresql+asyncpg://", "postgresql://")
    conn = await asyncpg.connect(dsn, server_settings=EVENTS_SESSION)
    try:
        report = []
        checked = 0
        for name, sql in sorted(vars(PostgresStatements()).items()):
            if not isinstance(sql, Sql):
                continue
            plan = await _plan(conn, f"aetr_{name}", sql)
            checked += 1
            scans = sorted({f"{n['Node Type']} on {n.get('Relation Name', '?')}" for n in _nodes(plan)
                            if n["Node Type"] in ("Seq Scan", "Bitmap Heap Scan", "Hash Join", "Merge Join")})
            if plan["Total Cost"] >= DISABLED_COST or scans:
                report.append(f"{name}: cost {plan['Total Cost']:.0f}, {', '.join(scans) or 'a disabled node'}")
        assert checked > 30
        assert not report, "event statements planned with what the events' sessions disable:\n" + "\n".join(report)
    finally:
        await conn.close()
