"""The statements a run sends stay shardable: each reads or writes the rows of one run, found by a run or node id.

On a PostgreSQL distributed by run (docs/scaling.md), a statement keyed by a run or node id touches one shard;
any other fans out to every shard. Every statement sent on PostgreSQL while a run of every kind of node starts,
has its calls dispatched, takes callbacks and a heartbeat, ends and has its end announced is recorded at the
driver, parsed, and checked: each reference to a run table (run_nodes, run_counters, work, events) must be
constrained by a key column — equal to a parameter, to a column of a table so constrained, or to a row of a
table expression (unnest of parameters, a common table expression whose own run tables are checked the same
way) — and an insert must name a key column. The statements that cannot be so are allow-listed below, each
with why and the section of docs/scaling.md that says what it costs on a distributed database.

PostgreSQL only: only PostgreSQL can be distributed, and SQLite differs where it must (it counts a step's slot
holders among all runs' nodes, a single writer's way).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any, cast

import asyncpg
import pytest
import sqlglot
from aiohttp import web
from sqlalchemy import event
from sqlglot import exp

from aetr.store.operations import Sql
from aetr.store.postgres_sql import PostgresStatements
from aetr.store.tables import metadata
from aetr.testing import StepRequest, StepService, callback, sync
from tests.integration.conftest import Server, running_server
from tests.integration.test_runs import api

pytestmark = pytest.mark.postgres

SCALING_MD = Path(__file__).parents[2] / "docs" / "scaling.md"

# A run's own tables, and the columns that name a run or one of its nodes (parent_id names the parent node).
RUN_KEYS: dict[str, frozenset[str]] = {
    "run_nodes": frozenset({"id", "root_id", "parent_id"}),
    "run_counters": frozenset({"node_id"}),
    "work": frozenset({"node_id", "root_id"}),
    "events": frozenset({"root_id", "node_id"}),
}
# Small tables changed rarely, copied whole to every node (reference tables): step definitions, read by every
# run start; settings; schedules, read by every process's ticker. Reading them anywhere costs nothing more;
# writing them is no part of a run.
REFERENCE_TABLES = frozenset({"steps", "step_children", "settings", "schedules", "schedule_runs"})
AETR_TABLES = frozenset(metadata.tables)
_AETR_TABLE_WORD = re.compile(r"\b(" + "|".join(sorted(AETR_TABLES)) + r")\b", re.IGNORECASE)

# The statements not keyed by a run, by their name in aetr.store.postgres_sql.PostgresStatements: the tables they
# reach other than by a run or node id, why, and the section of docs/scaling.md that covers them.
ALLOWED: dict[str, tuple[frozenset[str], str, str]] = {
    "claim": (frozenset({"work"}), "a worker claims whatever work is due, in any run", "claiming-due-work"),
    "next_due": (frozenset({"work"}), "a worker sleeps until the next due row of any run", "claiming-due-work"),
    "find_key": (frozenset({"run_nodes"}), "an idempotency key is unique across all runs", "idempotency-keys"),
    # A slot held past SLOT_ABANDONED_S is checked against its holder's node: run_nodes by a step_slots column.
    "take_slot": (frozenset({"step_slots", "run_nodes"}), "a step's slots are shared by the runs that call it",
                  "step-slots"),
    "take_slots": (frozenset({"step_slots", "run_nodes"}), "a batch's takes of one step's slots, for several runs",
                   "step-slots"),
    "make_slots": (frozenset({"step_slots"}), "a step's slots are shared by the runs that call it", "step-slots"),
    "wake_waiters": (frozenset({"work", "run_nodes", "step_slots"}), "attempts of any run wait for a slot of the step",
                     "step-slots"),
    "claim_waiting": (frozenset({"work", "run_nodes"}), "attempts of any run wait for a slot of the step",
                      "step-slots"),
    # The chains are keyed; the attempts claimed with them for the slots the events free are claim_waiting's.
    "load_chains_claiming": (frozenset({"work", "run_nodes"}), "attempts of any run wait for a slot of the step",
                             "step-slots"),
    # SQLite's way of counting slots and finding waiters (PostgreSQL has step_slots): prebuilt, never sent here.
    "count_slots": (frozenset({"run_nodes"}), "SQLite counts a step's slot holders among all runs' nodes",
                    "step-slots"),
    "next_waiting": (frozenset({"work", "run_nodes"}), "SQLite finds a step's waiters among all runs' work",
                     "step-slots"),
    # The rest of an event's one write is keyed; only the slot its ended attempt held is a step's row.
    "write_all": (frozenset({"step_slots"}), "an attempt that ends frees a slot of its step", "step-slots"),
}


# ---- the check --------------------------------------------------------------------------------------------

_OWNERS = (exp.Select, exp.Update, exp.Delete, exp.Insert)


def _owner(node: exp.Expression) -> exp.Expression | None:
    """The SELECT, UPDATE, DELETE or INSERT whose FROM, target or WHERE `node` belongs to."""
    parent = node.parent
    while parent is not None and not isinstance(parent, _OWNERS):
        parent = parent.parent
    return parent


def _sources(owner: exp.Expression) -> dict[str, exp.Expression]:
    """The tables and table expressions an owner reads or writes, by the name its columns use for them."""
    found: dict[str, exp.Expression] = {}
    for node in owner.find_all(exp.Table, exp.Unnest, exp.Subquery):
        if node is owner or _owner(node) is not owner or node.find_ancestor(exp.Lock) is not None:
            continue
        if isinstance(node, exp.Subquery) and not node.alias:
            continue  # a scalar subquery, not a table expression
        name = node.alias_or_name if not isinstance(node, exp.Unnest) else node.alias
        if name:
            found[name] = node
    return found


def _conjuncts(owner: exp.Expression) -> Iterator[exp.Expression]:
    """The conditions an owner's rows must all meet: its WHERE's and its joins' ONs, split at AND."""
    where = owner.args.get("where")
    conditions = [where.this] if where is not None else []
    conditions += [join.args["on"] for join in owner.args.get("joins") or () if join.args.get("on") is not None]
    for condition in conditions:
        parts = condition.flatten() if isinstance(condition, exp.And) else (condition,)
        yield from (cast(exp.Expression, part) for part in parts)


class _Check:
    """Which run-table references of one parsed statement are keyed by a run or node id."""

    def __init__(self, tree: exp.Expression) -> None:
        self.tree = tree
        self.run_refs = [t for t in tree.find_all(exp.Table)
                         if t.name in RUN_KEYS and t.find_ancestor(exp.Lock) is None]
        self.keyed: set[int] = set()
        changed = True
        while changed:  # a reference keyed by another one (a join) is found once that one is
            changed = False
            for ref in self.run_refs:
                if id(ref) not in self.keyed and self._is_keyed(ref):
                    self.keyed.add(id(ref))
                    changed = True

    def unkeyed(self) -> list[exp.Table]:
        return [t for t in self.run_refs if id(t) not in self.keyed]

    def _is_keyed(self, ref: exp.Table) -> bool:
        owner = _owner(ref)
        if owner is None:
            return False
        if isinstance(owner, exp.Insert):  # the inserted rows' provenance is checked with the SELECT's tables
            schema = owner.this
            return isinstance(schema, exp.Schema) and any(
                isinstance(c, exp.Identifier | exp.Column) and c.name in RUN_KEYS[ref.name]
                for c in schema.expressions)
        for condition in _conjuncts(owner):
            pairs: list[tuple[exp.Expression, exp.Expression]] = []
            if isinstance(condition, exp.EQ):
                pairs = [(condition.this, condition.expression), (condition.expression, condition.this)]
            elif isinstance(condition, exp.In):
                pairs = [(condition.this, q) for q in (condition.args.get("query"), *condition.expressions) if q]
            for column, value in pairs:
                if (isinstance(column, exp.Column) and column.name in RUN_KEYS[ref.name]
                        and self._resolve(column) is ref and self._bound(value)):
                    return True
        return False

    def _resolve(self, column: exp.Column) -> exp.Expression | None:
        """The table or table expression a column belongs to (its own query's, then enclosing ones')."""
        owner = _owner(column)
        if not column.table:
            sources = list(_sources(owner).values()) if owner is not None else []
            runs = [s for s in sources if isinstance(s, exp.Table) and s.name in RUN_KEYS]
            return sources[0] if len(sources) == 1 else runs[0] if len(runs) == 1 else None
        while owner is not None:
            found = _sources(owner).get(column.table)
            if found is not None:
                return found
            owner = _owner(owner)
        return None

    def _bound(self, value: exp.Expression) -> bool:
        """Whether a value is one the statement was given, or comes from rows themselves keyed."""
        while isinstance(value, exp.Cast | exp.Paren | exp.Any):
            value = value.this
        if isinstance(value, exp.Placeholder | exp.Parameter | exp.Literal):
            return True
        if isinstance(value, exp.Column):
            source = self._resolve(value)
            if isinstance(source, exp.Table) and source.name in RUN_KEYS:
                return id(source) in self.keyed
            # A table expression (unnest, a CTE) is checked where it is defined; another table of ours is not
            # a run's.
            return source is not None and not (isinstance(source, exp.Table) and source.name in AETR_TABLES)
        if isinstance(value, exp.Subquery | exp.Select):
            inner = [t for t in value.find_all(exp.Table) if t.name in AETR_TABLES]
            return bool(inner) and all(t.name in RUN_KEYS and id(t) in self.keyed for t in inner)
        return False


def problems(sql: str, dialect: str = "postgres") -> list[tuple[str, str]]:
    """(table, why) for each of our tables a statement reaches other than by a run or node id (nothing when it is
    keyed, or touches none of our tables)."""
    if not _AETR_TABLE_WORD.search(sql):
        return []  # BEGIN, COMMIT, the driver's own catalog queries
    tree = cast(exp.Expression, sqlglot.parse_one(sql, read=dialect))  # a statement: an Expression
    found = [(ref.name, f"{ref.name} AS {ref.alias_or_name} is not keyed by a run or node id")
             for ref in _Check(tree).unkeyed()]
    for table in tree.find_all(exp.Table):
        owner = _owner(table)
        if table.name not in AETR_TABLES or table.name in RUN_KEYS:
            continue
        if table.name not in REFERENCE_TABLES:
            found.append((table.name, f"{table.name} is no run's table"))
        elif isinstance(owner, exp.Insert | exp.Update | exp.Delete) and owner.this in (table, table.parent):
            found.append((table.name, f"{table.name}, a reference table, is written"))
    return sorted(set(found))


def _slug(heading: str) -> str:
    """The anchor MkDocs gives a heading (lower case, punctuation dropped, spaces as hyphens)."""
    return re.sub(r"[-\s]+", "-", re.sub(r"[^\w\s-]", "", heading).strip().lower())


def scaling_sections() -> set[str]:
    return {_slug(line.lstrip("#")) for line in SCALING_MD.read_text().splitlines() if line.startswith("#")}


# ---- what runs ----------------------------------------------------------------------------------------------

@pytest.fixture
def recorded(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every statement sent on the events' asyncpg pools opened from now on (the SQLAlchemy engine is added by
    the test once its server is up)."""
    seen: list[str] = []
    create_pool = asyncpg.create_pool

    def logged_pool(*args: Any, **kwargs: Any) -> Any:
        async def init(conn: asyncpg.Connection) -> None:
            conn.add_query_logger(lambda query: seen.append(query.query))

        return create_pool(*args, init=init, **kwargs)

    monkeypatch.setattr(asyncpg, "create_pool", logged_pool)
    return seen


@pytest.fixture
async def aetr_pg(pg_url: str, recorded: list[str]) -> AsyncIterator[Server]:
    async with running_server(pg_url, notify_backoff_s=0.05) as server:
        yield server


async def beating(request: StepRequest) -> web.StreamResponse:
    """A heartbeat, then the output."""

    async def work() -> None:
        assert (await request.send_heartbeat()).status == 200
        await request.send_output({"beat": True})

    request.later(work())
    return web.Response(status=202)


async def eventually(check: Callable[[], Any], what: str, timeout: float = 10.0) -> None:  # noqa: ASYNC109
    deadline = asyncio.get_running_loop().time() + timeout
    while not await check():
        assert asyncio.get_running_loop().time() < deadline, f"{what} within {timeout} s"
        await asyncio.sleep(0.05)


async def test_every_statement_of_a_run_is_keyed_by_a_run_or_node_or_allowed(
        aetr_pg: Server, recorded: list[str], steps_service: StepService) -> None:
    svc, aetr = steps_service, aetr_pg
    svc.route("/beat", beating)
    svc.route("/a", callback(lambda x: {"a": x}))
    svc.route("/b", sync(lambda x: {"b": x}))
    svc.route("/item", callback(lambda x: x * 2))
    svc.route("/hook", sync(lambda _: None))
    await aetr.put_step({"name": "everything", "kind": "sequential", "children": [
        {"step": api(svc, "beat", heartbeat_s=5)},
        {"step": {"name": "both", "kind": "parallel", "children": [
            {"step": api(svc, "a")}, {"step": api(svc, "b", mode="sync")}]}},
        {"step": {"name": "each", "kind": "map", "child": {"step": api(svc, "item", max_concurrency=2)}},
         "mapper": "() => [1, 2, 3, 4, 5]"},
        {"step": {"name": "pick", "kind": "choice", "children": [
            {"step": {"name": "never", "kind": "wait", "signal": True}, "when": "(xs) => xs.length > 10"},
            {"step": {"name": "pause", "kind": "wait", "seconds": 0.1}}]}},
    ]})
    event.listen(aetr.engine.store.engine.sync_engine, "before_cursor_execute",
                 lambda _conn, _cursor, statement, *_: recorded.append(statement))
    recorded.clear()
    status, body = await aetr.call("POST", "/api/v1/runs", {"step": "everything", "notify": svc.url("/hook")},
                                   headers={"Idempotency-Key": "shardable-1"})
    assert status == 201, body
    run = await aetr.wait_run(body["id"])
    assert run["state"] == "complete", run
    assert run["output"] == [2, 4, 6, 8, 10]

    async def announced() -> bool:
        return any(e["kind"] == "notify" and e["data"]["outcome"] == "delivered"
                   for e in await aetr.events(run["id"]))

    await eventually(announced, "the run's end was announced")
    assert len(svc.calls("/item")) == 5 and len(svc.calls("/hook")) == 1

    st = PostgresStatements()
    allowed = {getattr(st, name).text: tables for name, (tables, _why, _section) in ALLOWED.items()}
    report = []
    for sql in set(recorded):
        why = [text for table, text in problems(sql) if table not in allowed.get(sql, ())]
        if why:
            report.append(f"{' '.join(sql.split())[:160]}...: {'; '.join(why)}")
    assert not report, "statements not keyed by a run or node id:\n" + "\n".join(report)
    # What was recorded is what a run sends: its events' writes, and the claims of due work among them.
    assert st.write_all is not None and st.write_all.text in recorded and st.claim.text in recorded


def test_every_prebuilt_event_statement_is_keyed_by_a_run_or_node_or_allowed() -> None:
    """Also the statements the run above did not happen to send (a cancel, a retry, a batch of chains...)."""
    st = PostgresStatements()
    report = []
    for name, sql in sorted(vars(st).items()):
        if isinstance(sql, Sql):
            allowed = ALLOWED.get(name, (frozenset(), "", ""))[0]
            why = [text for table, text in problems(sql.text) if table not in allowed]
            if why:
                report.append(f"{name}: {'; '.join(why)}")
    assert not report, "statements not keyed by a run or node id:\n" + "\n".join(report)


def test_each_allowed_statement_is_unkeyed_and_its_section_of_the_docs_exists() -> None:
    st, sections = PostgresStatements(), scaling_sections()
    for name, (tables, _why, section) in ALLOWED.items():
        reached = {table for table, _ in problems(getattr(st, name).text)}
        assert reached == tables, f"{name} reaches {sorted(reached)} other than by a run: update its entry"
        assert section in sections, f"docs/scaling.md has no section #{section} for {name}"


@pytest.mark.parametrize("sql", [
    "SELECT count(*) FROM run_nodes WHERE state = $1",
    "UPDATE work SET lease_owner = NULL WHERE lease_owner = $1",
    "DELETE FROM events WHERE at < $1",
    "SELECT * FROM run_nodes WHERE id = $1 OR state = 'running'",
    "SELECT n.* FROM run_nodes AS n JOIN work AS w ON w.node_id = n.id WHERE w.kind = 'dispatch'",
    "INSERT INTO events (at, kind, data) SELECT now(), 'x', '{}' FROM run_nodes WHERE id = $1",
    "SELECT * FROM run_nodes WHERE id IN (SELECT holder_id FROM step_slots WHERE step_id = $1)",
    "WITH x AS (SELECT id FROM run_nodes WHERE state = 'a') SELECT n.* FROM run_nodes AS n JOIN x ON n.id = x.id",
    "WITH RECURSIVE up(id, parent_id) AS (SELECT id, parent_id FROM run_nodes WHERE state = $1 UNION ALL"
    " SELECT p.id, p.parent_id FROM run_nodes AS p JOIN up ON p.id = up.parent_id) SELECT * FROM up",
    "UPDATE schedules SET next_run_at = $1 WHERE id = $2",
    "UPDATE steps SET version = version + 1 WHERE id = $1",
])
def test_the_check_finds_statements_not_keyed_by_a_run(sql: str) -> None:
    assert problems(sql)


@pytest.mark.parametrize("sql", [
    "SELECT * FROM run_nodes WHERE root_id = $1::VARCHAR",
    "DELETE FROM work WHERE node_id = ANY($1::varchar[]) AND kind = 'heartbeat'",
    "INSERT INTO events (root_id, node_id, at, kind, data) SELECT * FROM unnest($1::varchar[], $2::varchar[],"
    " $3::timestamptz[], $4::varchar[], $5::text[])",
    "SELECT * FROM run_nodes WHERE id = (SELECT root_id FROM run_nodes WHERE id = $1)",
    "SELECT s.* FROM run_nodes AS s JOIN run_nodes AS me ON s.parent_id = me.parent_id WHERE me.id = $1",
    "UPDATE run_nodes AS n SET state = v.state FROM unnest($1::varchar[], $2::varchar[]) AS v(id, state)"
    " WHERE n.id = v.id",
    "UPDATE run_nodes AS n SET state = v.state FROM json_to_recordset($1::json) AS v(id varchar, state varchar)"
    " WHERE n.id = v.id",
    "WITH RECURSIVE up(id, parent_id) AS (SELECT id, parent_id FROM run_nodes WHERE id = $1 UNION ALL"
    " SELECT p.id, p.parent_id FROM run_nodes AS p JOIN up ON p.id = up.parent_id) SELECT * FROM up",
    "SELECT * FROM work WHERE node_id IN (SELECT id FROM run_nodes WHERE root_id = $1)",
    "SELECT * FROM steps WHERE name = $1",
    "SELECT * FROM schedules WHERE next_run_at <= $1 ORDER BY next_run_at LIMIT 10",
])
def test_the_check_passes_statements_keyed_by_a_run_or_node(sql: str) -> None:
    assert problems(sql) == []
