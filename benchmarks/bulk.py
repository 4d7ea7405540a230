"""Stored runs made in bulk with SQL, not through the API: a database that has kept many runs, in seconds.

Each run is a sequential root with `steps` api children, all ended (complete) at `ended_at`, with an event per
node as a run's history has: the rows a real run of that tree leaves behind, of about the same size. Their ids
start with `00`, which no id AETR makes now does (its ids start with the millisecond they were made, in
hexadecimal: `019…` in 2026, `00…` only before 2004), and so sort before every new run's, as the ids of runs
that ended before AETR made them would: a new run's rows go at the end of each index keyed by id, as they do
in a database that kept its own runs. (Ids that sorted after the new runs', as these did before, put every new
row in the middle of those indexes, where each split leaves two half-full pages: one commit in 90 of a chain
made a checkpoint, against one in 106 on an empty database.)
"""

from __future__ import annotations

import asyncio
import sqlite3
from datetime import UTC, datetime
from typing import Final

import asyncpg

CHUNK_RUNS: Final = 10_000  # runs inserted per statement (per transaction on SQLite)
MAX_RUNS: Final = 0xFFFFFF + 1
CONFIG: Final = '{"url": "http://127.0.0.1:9/step", "mode": "callback", "timeout_s": 30}'
OUTPUT: Final = '{"ok": true, "n": 1}'


def _sql(dialect: str) -> tuple[str, str]:
    """The INSERT ... SELECT of a chunk's nodes and of their events; parameters: first run, last run, ended_at,
    steps. Node k (0: the root) of run g has the id 00 + g (6 hex digits) + ... + k (12 hex digits)."""
    if dialect == "sqlite":
        series = ("WITH RECURSIVE g(n) AS (SELECT :first UNION ALL SELECT n + 1 FROM g WHERE n < :last),"
                  " k(n) AS (SELECT 0 UNION ALL SELECT n + 1 FROM k WHERE n < :steps)")
        node_id = "printf('00%06x-0000-7000-8000-%012x', g.n, k.n)"
        root_id = "printf('00%06x-0000-7000-8000-%012x', g.n, 0)"
        source, at = "g, k", ":ended_at"
    else:
        series = ""
        node_id = "'00' || lpad(to_hex(g), 6, '0') || '-0000-7000-8000-' || lpad(to_hex(k), 12, '0')"
        root_id = "'00' || lpad(to_hex(g), 6, '0') || '-0000-7000-8000-000000000000'"
        source = "generate_series($1::int, $2::int) AS g, generate_series(0, $4::int) AS k"
        at = "$3::timestamptz"
    k = "k.n" if dialect == "sqlite" else "k"
    nodes = (f"{series} INSERT INTO run_nodes (id, root_id, parent_id, position, step_id, step_name, step_kind,"
             " step_version, config, n_children, state, input, output, attempt, attempt_base, version, created_at,"
             " started_at, completed_at, awaits_signal, holds_slot)"
             f" SELECT {node_id}, {root_id}, CASE WHEN {k} = 0 THEN NULL ELSE {root_id} END,"
             f" CASE WHEN {k} = 0 THEN 0 ELSE {k} - 1 END, 'bulk-step', CASE WHEN {k} = 0 THEN 'bulk' ELSE 'bulk-'"
             f" || {k} END, CASE WHEN {k} = 0 THEN 'sequential' ELSE 'api' END, 1, '{CONFIG}',"
             f" CASE WHEN {k} = 0 THEN {':steps' if dialect == 'sqlite' else '$4::int'} ELSE 0 END, 'complete',"
             f" '{OUTPUT}', '{OUTPUT}', 1, 0, 3, {at}, {at}, {at}, false, false FROM {source}")
    events = (f"{series} INSERT INTO events (root_id, node_id, at, kind, data)"
              f" SELECT {root_id}, {node_id}, {at}, CASE WHEN {k} = 0 THEN 'run_completed' ELSE 'completed' END,"
              f" '{OUTPUT}' FROM {source}")
    return nodes, events


def _load_sqlite(path: str, runs: int, steps: int, ended_at: datetime) -> None:
    nodes, events = _sql("sqlite")
    conn = sqlite3.connect(path, timeout=60, isolation_level=None)
    try:
        conn.execute("PRAGMA busy_timeout=60000")
        # Stored as the application stores it: naive UTC text (aetr.store.tables.UTCDateTime).
        at = ended_at.astimezone(UTC).replace(tzinfo=None).isoformat(sep=" ")
        for first in range(0, runs, CHUNK_RUNS):
            values = {"first": first, "last": min(runs, first + CHUNK_RUNS) - 1, "steps": steps, "ended_at": at}
            conn.execute("BEGIN IMMEDIATE")
            conn.execute(nodes, values)
            conn.execute(events, values)
            conn.execute("COMMIT")
    finally:
        conn.close()


async def _load_postgres(url: str, runs: int, steps: int, ended_at: datetime) -> None:
    nodes, events = _sql("postgresql")
    conn = await asyncpg.connect(url)
    try:
        for first in range(0, runs, CHUNK_RUNS):
            last = min(runs, first + CHUNK_RUNS) - 1
            async with conn.transaction():
                await conn.execute(nodes, first, last, ended_at, steps)
                await conn.execute(events.replace("$4::int", str(steps)), first, last, ended_at)
        # Vacuumed now, as a database that has kept these runs for a day would have been: left to autovacuum (it
        # vacuums a table once a fifth of it is new rows), the pass came in the middle of what was measured next,
        # and doubled the purge scenario's p99 with nothing deleted.
        await conn.execute("VACUUM (ANALYZE) run_nodes")
        await conn.execute("VACUUM (ANALYZE) events")
        await conn.execute("CHECKPOINT")
    finally:
        await conn.close()


async def load_ended_runs(database_url: str, runs: int, steps: int, ended_at: datetime) -> None:
    """Store `runs` ended runs of a sequential root and `steps` api children, ended at `ended_at`, directly in
    the (migrated) database at `database_url`, as AETR's own URLs name it (sqlite:///… or postgresql://…)."""
    if runs > MAX_RUNS:
        raise ValueError(f"at most {MAX_RUNS:,} runs: their number is 6 hexadecimal digits of their ids")
    if database_url.startswith("sqlite"):
        await asyncio.to_thread(_load_sqlite, database_url.split("///", 1)[1], runs, steps, ended_at)
    else:
        await _load_postgres(database_url.replace("postgresql+asyncpg://", "postgresql://"), runs, steps, ended_at)
