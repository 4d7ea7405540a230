"""The hot path's SQL: statements built once with SQLAlchemy Core, compiled once per dialect, run on the raw driver.

An event (a callback, a deadline, a new run) is a *program*: a generator that yields requests — the decide
handlers' `LoadChild`, `BumpDone`… and the store's own `LoadChain`, `Apply`… — and receives their answers.
`lower` turns each request into plain operations (`Fetch`, `Exec`, `ExecMany`) on prebuilt statements, so the
SQLite backend can run a whole event in its writer thread and the PostgreSQL backend on one asyncpg
connection, with the same code deciding what to send. SQLAlchemy's per-statement machinery (compiling,
caching, type processing, pool events) cost more than the database itself on this path; the profile is in
docs/performance.md.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import orjson
from sqlalchemy import (
    and_,
    bindparam,
    delete,
    func,
    insert,
    literal_column,
    null,
    or_,
    select,
    text,
    union_all,
    update,
)
from sqlalchemy.dialects.postgresql.asyncpg import dialect as asyncpg_dialect
from sqlalchemy.dialects.sqlite.aiosqlite import dialect as aiosqlite_dialect
from sqlalchemy.sql import ClauseElement

from aetr.domain import decide
from aetr.domain.runs import EventRecord, Node, Plan, Work, node_of
from aetr.domain.steps import StepConfig, StepTree
from aetr.store.tables import events, run_counters, run_nodes, work

DialectName = Literal["sqlite", "postgresql"]


class Conflict(Exception):
    """Another transaction changed a node this one read: the event must be handled again."""


class NeedsScripts(Exception):
    """An event's program asked for scripts while the database was held: run them, then the event again."""

    def __init__(self, requests: list[decide.RunScript]) -> None:
        super().__init__(f"{len(requests)} script(s) to run before the event")
        self.requests = requests


class Duplicate(Exception):
    """A unique key was taken by another transaction (two starts with one idempotency key)."""


class Unavailable(Exception):
    """The database refused or dropped the connection, or is out of connections: an outage to wait out."""


# SQLSTATE classes and codes of an outage rather than a bug: connection exceptions, insufficient resources,
# operator intervention (shutting down, starting up), and "not accepting connections".
OUTAGE_SQLSTATE_CLASSES = ("08", "53", "57")
OUTAGE_SQLSTATES = ("55000",)


def is_outage_sqlstate(code: str | None) -> bool:
    """Whether a SQLSTATE says the database is unavailable (answer 503 and retry) rather than our mistake."""
    return bool(code) and (code[:2] in OUTAGE_SQLSTATE_CLASSES or code in OUTAGE_SQLSTATES)  # type: ignore[index]


# ---- statements -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sql:
    """A statement compiled for one dialect: its text and the order of its parameters."""

    text: str
    names: tuple[str, ...]
    defaults: dict[str, Any]
    writes: bool = True  # False for a read, which never opens a transaction
    # Atomic by itself: PostgreSQL runs it without BEGIN and COMMIT when it is the only write of its program.
    alone: bool = False

    def args(self, values: dict[str, Any]) -> tuple[Any, ...]:
        """Positional arguments for the driver from named values."""
        return self._pick(values if not self.defaults else {**self.defaults, **values})

    @functools.cached_property
    def _pick(self) -> Callable[[dict[str, Any]], tuple[Any, ...]]:
        # One C call per row (itemgetter answers a tuple for two names or more), not a generator of lookups.
        if len(self.names) >= 2:
            return operator.itemgetter(*self.names)
        if self.names:
            (name,) = self.names
            return lambda values: (values[name],)
        return lambda values: ()


def compile_sql(stmt: ClauseElement, dialect: DialectName) -> Sql:
    """Compile a Core statement once for `dialect` (qmark for sqlite3, $n for asyncpg)."""
    compiled = stmt.compile(dialect=aiosqlite_dialect() if dialect == "sqlite" else asyncpg_dialect())  # type: ignore[no-untyped-call]
    names = tuple(getattr(compiled, "positiontup", None) or ())
    defaults = {k: v for k, v in compiled.params.items() if v is not None}
    return Sql(str(compiled), names, defaults)


def _p(name: str) -> Any:
    return bindparam(name)


NODE_COLUMNS = [c for c in run_nodes.c if c.name != "snapshot"]  # the snapshot is only read by GET /runs
VIEW_COLUMNS = [run_nodes.c[name] for name in (
    "id", "root_id", "parent_id", "position", "step_id", "step_name", "step_kind", "step_version", "state", "input",
    "output", "error", "attempt", "version", "created_at", "started_at", "completed_at")]
STATE_COLUMNS = ("state", "input", "output", "error", "attempt", "attempt_base", "version", "started_at",
                 "completed_at")
WORK_RETURNED = (work.c.kind, work.c.node_id, work.c.root_id, work.c.attempt, work.c.due_at)


def _chain_stmt() -> Any:
    """A node and its ancestors (first column 0), and the node's next sibling (first column 1), in one query.

    The sibling is what a sequential parent starts next; reading it here saves that event a round trip. A
    parallel parent's children need no sibling, so none is read for them (a fan-out's callbacks decode a node
    fewer each).
    """
    step = run_nodes.alias("step")
    chain = select(run_nodes.c.id, run_nodes.c.parent_id).where(run_nodes.c.id == _p("node_id")).cte(
        "chain", recursive=True)
    chain = chain.union_all(select(step.c.id, step.c.parent_id).join(chain, step.c.id == chain.c.parent_id))
    me, sib = run_nodes.alias("me"), run_nodes.alias("sib")
    following = (select(literal_column("1").label("extra"), *[sib.c[c.name] for c in NODE_COLUMNS])
                 .join(me, and_(sib.c.parent_id == me.c.parent_id, sib.c.position == me.c.position + 1))
                 .where(me.c.id == _p("node_id")).where(_parent_kind(me) == "sequential"))
    ancestors = select(literal_column("0").label("extra"), *NODE_COLUMNS).join(chain, run_nodes.c.id == chain.c.id)
    return union_all(ancestors, following)


def _parent_kind(me: Any) -> Any:
    """The kind of `me`'s parent, as a subquery per row of `me`.

    Not a join: as a join, a plan made while the tables were nearly empty (a generic plan, made once per
    connection) started from the parents — every sequential node of the database, filtered by kind — and only
    then looked for the nodes asked about. PostgreSQL spent 8-15 ms on each batch of chains that way, most of
    its CPU in the throughput scenario, and more as the table grew. As a subquery it can only be evaluated for
    the nodes asked about.
    """
    parent = run_nodes.alias("parent")
    return select(parent.c.step_kind).where(parent.c.id == me.c.parent_id).scalar_subquery()


def _chains_stmt() -> Any:
    """PostgreSQL: _chain_stmt for several nodes at once (an array `ids`), each row led by the node it is for."""
    step = run_nodes.alias("step")
    chain = (select(run_nodes.c.id.label("start"), run_nodes.c.id, run_nodes.c.parent_id)
             .where(run_nodes.c.id == func.any(_p("ids"))).cte("chain", recursive=True))
    chain = chain.union_all(select(chain.c.start, step.c.id, step.c.parent_id)
                            .join(chain, step.c.id == chain.c.parent_id))
    me, sib = run_nodes.alias("me"), run_nodes.alias("sib")
    following = (select(me.c.id.label("start"), literal_column("1").label("extra"),
                        *[sib.c[c.name] for c in NODE_COLUMNS])
                 .join(me, and_(sib.c.parent_id == me.c.parent_id, sib.c.position == me.c.position + 1))
                 .where(me.c.id == func.any(_p("ids"))).where(_parent_kind(me) == "sequential"))
    ancestors = (select(chain.c.start, literal_column("0").label("extra"), *NODE_COLUMNS)
                 .join(chain, run_nodes.c.id == chain.c.id))
    return union_all(ancestors, following)


def _subtree_stmt() -> Any:
    kid = run_nodes.alias("kid")
    sub = select(run_nodes.c.id).where(run_nodes.c.id == _p("node_id")).cte("sub", recursive=True)
    sub = sub.union_all(select(kid.c.id).join(sub, kid.c.parent_id == sub.c.id))
    return select(*NODE_COLUMNS).join(sub, run_nodes.c.id == sub.c.id)


def _claim_stmt(dialect: DialectName) -> Any:
    due = or_(work.c.lease_until.is_(None), work.c.lease_until < _p("now"))
    ids = select(work.c.id).where(work.c.due_at <= _p("now")).where(due).order_by(work.c.due_at).limit(_p("limit"))
    if dialect == "postgresql":
        ids = ids.with_for_update(skip_locked=True)  # two processes claiming at once skip each other's rows
    return (update(work).where(work.c.id.in_(ids.scalar_subquery()))
            .values(lease_owner=_p("owner"), lease_until=_p("until")).returning(*WORK_RETURNED))


WORK_FIELDS = ("kind", "node_id", "root_id", "attempt", "due_at", "lease_owner", "lease_until")
EVENT_FIELDS = ("root_id", "node_id", "at", "kind", "data")
# An event's work and history changes as arrays, written by one statement: the deletes see the rows as they
# were before it, so an event that re-arms a node (drops its work, inserts new) keeps the new rows.
NODE_FIELDS = ("k_id", "k_version", *STATE_COLUMNS)
# run_nodes' columns as PostgreSQL array element types, for a new run's rows.
_NODE_TYPES_PG = tuple({"id": "varchar", "root_id": "varchar", "parent_id": "varchar", "position": "integer",
                        "step_id": "varchar", "step_name": "varchar", "step_kind": "varchar",
                        "step_version": "integer", "config": "text", "mapper": "text", "n_children": "integer",
                        "state": "varchar", "input": "text", "output": "text", "error": "text", "attempt": "integer",
                        "attempt_base": "integer", "version": "integer", "created_at": "timestamptz",
                        "started_at": "timestamptz", "completed_at": "timestamptz", "snapshot": "text",
                        "idempotency_key": "varchar"}[c.name] for c in run_nodes.c)
WRITE_ALL_PG = (
    "WITH dropped AS (DELETE FROM work WHERE node_id = ANY($1::varchar[])),"
    " beats AS (DELETE FROM work WHERE kind = 'heartbeat' AND node_id = ANY($2::varchar[])),"
    " added AS (INSERT INTO work (kind, node_id, root_id, attempt, due_at, lease_owner, lease_until)"
    " SELECT * FROM unnest($3::varchar[], $4::varchar[], $5::varchar[], $6::integer[], $7::timestamptz[],"
    " $8::varchar[], $9::timestamptz[])),"
    " logged AS (INSERT INTO events (root_id, node_id, at, kind, data)"
    " SELECT * FROM unnest($10::varchar[], $11::varchar[], $12::timestamptz[], $13::varchar[], $14::text[])),"
    " updated AS (UPDATE run_nodes AS n SET state = v.state, input = v.input, output = v.output, error = v.error,"
    " attempt = v.attempt, attempt_base = v.attempt_base, version = v.version, started_at = v.started_at,"
    " completed_at = v.completed_at"
    " FROM unnest($15::varchar[], $16::integer[], $17::varchar[], $18::text[], $19::text[], $20::text[],"
    " $21::integer[], $22::integer[], $23::integer[], $24::timestamptz[], $25::timestamptz[])"
    " AS v(id, k_version, state, input, output, error, attempt, attempt_base, version, started_at, completed_at)"
    " WHERE n.id = v.id AND n.version = v.k_version RETURNING 1),"
    " finished AS (DELETE FROM work AS w USING unnest($26::varchar[], $27::integer[], $28::varchar[])"
    " AS f(node_id, attempt, kind) WHERE w.node_id = f.node_id AND w.attempt = f.attempt AND w.kind = f.kind),"
    " new_nodes AS (INSERT INTO run_nodes (" + ", ".join(c.name for c in run_nodes.c) + ")"
    " SELECT * FROM unnest(" + ", ".join(f"${30 + i}::{t}[]" for i, t in enumerate(_NODE_TYPES_PG)) + ")),"
    f" new_counters AS (INSERT INTO run_counters (node_id, done) SELECT * FROM unnest(${30 + len(_NODE_TYPES_PG)}"
    f"::varchar[], ${31 + len(_NODE_TYPES_PG)}::integer[]))"
    # A node changed meanwhile: aetr_expect_rows (migration 0004) aborts the whole statement, which is atomic
    # by itself and so runs without BEGIN and COMMIT.
    " SELECT aetr_expect_rows(count(*), $29::integer) FROM updated"
)
# Finished children counted exactly once (arrays of parent ids and positions): each `count` row is deleted and
# each parent's counter bumped once by its number of children counted here, in one statement that holds the
# counters' row locks only while it runs (in autocommit), not until an event's commit. A count that completes
# its set inserts the parent's `complete` row in the same statement; answers the parents so completed.
COUNT_CHILDREN_PG = (
    "WITH counted AS (DELETE FROM work AS w USING unnest($1::varchar[], $2::integer[]) AS c(node_id, attempt)"
    " WHERE w.node_id = c.node_id AND w.kind = 'count' AND w.attempt = c.attempt RETURNING w.node_id, w.root_id),"
    " per AS (SELECT node_id, min(root_id) AS root_id, count(*) AS n FROM counted GROUP BY node_id),"
    " bumped AS (UPDATE run_counters AS rc SET done = rc.done + per.n FROM per WHERE rc.node_id = per.node_id"
    " RETURNING rc.node_id, rc.done, per.root_id),"
    " last AS (INSERT INTO work (kind, node_id, root_id, attempt, due_at, lease_owner, lease_until)"
    " SELECT 'complete', b.node_id, b.root_id, 0, $3::timestamptz, $4::varchar, $5::timestamptz"
    " FROM bumped AS b JOIN run_nodes AS n ON n.id = b.node_id WHERE b.done = n.n_children RETURNING node_id)"
    " SELECT node_id FROM last"
)
FINISHED_FIELDS = ("node_id", "attempt", "kind")
RUN_NODE_NAMES = tuple(c.name for c in run_nodes.c)
COUNTER_NAMES = ("node_id", "done")
# write_all's array parameters by group: (parameter, column of the group's rows); and each group with no rows.
_ARRAY_KEYS = {prefix: tuple((prefix + name, name) for name in names) for prefix, names in (
    ("i_", RUN_NODE_NAMES), ("c_", COUNTER_NAMES), ("n_", NODE_FIELDS), ("w_", WORK_FIELDS), ("e_", EVENT_FIELDS),
    ("f_", FINISHED_FIELDS))}
_NO_ROWS: dict[str, dict[str, tuple[()]]] = {prefix: {key: () for key, _ in keys}
                                             for prefix, keys in _ARRAY_KEYS.items()}
WRITE_ALL_NAMES = ("drop", "beats", *(f"w_{k}" for k in WORK_FIELDS), *(f"e_{k}" for k in EVENT_FIELDS),
                   *(f"n_{k}" for k in NODE_FIELDS), *(f"f_{k}" for k in FINISHED_FIELDS), "expected",
                   *(f"i_{name}" for name in RUN_NODE_NAMES), *(f"c_{name}" for name in COUNTER_NAMES))


# SQLite: every node of the run a node belongs to, as (id, parent_id, position, the node's JSON as the API shows
# it without `children`), the JSON written by SQLite (json_object; stored JSON goes out as it is) and only
# nested in Python (nest_json). Times as orjson writes an aware UTC datetime. On PostgreSQL the same
# answer built by json_build_object took 249 ms for 10,000 nodes against 207 ms from the plain columns, so
# PostgreSQL answers from run_view (PostgresStore.get_run_json).
def _when(col: str) -> str:
    return (f"CASE WHEN {col} IS NULL THEN NULL"
            f" ELSE replace(substr({col}, 1, 10) || 'T' || substr({col}, 12), '.000000', '') || '+00:00' END")


RUN_JSON_SQLITE = (
    "SELECT id, parent_id, position, json_object('id', id, 'root_id', root_id, 'parent_id', parent_id,"
    " 'position', position, 'step', json_object('id', step_id, 'name', step_name, 'kind', step_kind,"
    " 'version', step_version), 'state', state, 'input', json(input), 'output', json(output),"
    f" 'error', json(error), 'attempt', attempt, 'version', version, 'created_at', {_when('created_at')},"
    f" 'started_at', {_when('started_at')}, 'completed_at', {_when('completed_at')})"
    " FROM run_nodes WHERE root_id = (SELECT root_id FROM run_nodes WHERE id = ?)"
)


def nest(flat: list[dict[str, Any]]) -> dict[str, Any]:
    """Nodes as the API shows them (each with `parent_id` and `position`) nested into their run tree."""
    by_parent: dict[str | None, list[dict[str, Any]]] = {}
    for n in flat:
        by_parent.setdefault(n["parent_id"], []).append(n)
    for kids in by_parent.values():
        kids.sort(key=lambda n: n["position"])
    (root,) = by_parent[None]
    stack = [root]
    while stack:  # iterative: a deep tree must not exhaust Python's recursion limit
        obj = stack.pop()
        obj["children"] = by_parent.get(obj["id"], [])
        stack.extend(obj["children"])
    return root


def nest_json(rows: Sequence[Sequence[Any]]) -> bytes:
    """The run tree's JSON from run_json rows: each node's text with its children's texts in `children`,
    in position order, joined once (no text is copied per level of the tree)."""
    text_of: dict[str, str] = {}
    kids: dict[str | None, list[tuple[int, str]]] = {}
    for node_id, parent_id, position, node_text in rows:
        text_of[node_id] = node_text
        kids.setdefault(parent_id, []).append((position, node_id))
    ((_, root),) = kids[None]
    parts: list[str] = []
    stack: list[str] = [root]  # node ids to open, and the two markers below
    while stack:
        item = stack.pop()
        if item is _CLOSE or item is _COMMA:
            parts.append(item)
            continue
        node_text = text_of[item]
        parts.append(node_text[:node_text.rindex("}")])
        parts.append(',"children":[')
        stack.append(_CLOSE)
        children = sorted(kids.get(item, ()), reverse=True)  # the first child is popped first
        for i, (_, child) in enumerate(children):
            if i:
                stack.append(_COMMA)
            stack.append(child)
    return "".join(parts).encode()


_CLOSE = "]}"
_COMMA = ","


class Statements:
    """Every statement the hot path sends, compiled for one dialect."""

    def __init__(self, dialect: DialectName) -> None:
        self.dialect = dialect

        def c(stmt: Any) -> Sql:
            return compile_sql(stmt, dialect)

        def read(stmt: Any) -> Sql:
            return replace(c(stmt), writes=False)

        def alone(stmt: Any) -> Sql:
            return replace(c(stmt), alone=True)

        self.load_tree = read(TREE_SQL)
        self.load_chain = read(_chain_stmt())
        self.load_subtree = read(_subtree_stmt())
        self.load_children = read(select(*NODE_COLUMNS).where(run_nodes.c.parent_id == _p("parent_id"))
                                  .order_by(run_nodes.c.position))
        self.load_child = read(select(*NODE_COLUMNS).where(
            and_(run_nodes.c.parent_id == _p("parent_id"), run_nodes.c.position == _p("position"))))
        self.bump_done = c(update(run_counters).where(run_counters.c.node_id == _p("parent_id"))
                           .values(done=run_counters.c.done + 1).returning(run_counters.c.done))
        self.set_done = c(update(run_counters).where(run_counters.c.node_id == _p("parent_id"))
                          .values(done=_p("value")))
        self.insert_counter = c(insert(run_counters).values(node_id=_p("node_id"), done=_p("done")))
        self.update_node = c(update(run_nodes)
                             .where(and_(run_nodes.c.id == _p("k_id"), run_nodes.c.version == _p("k_version")))
                             .values({name: _p(name) for name in STATE_COLUMNS}))
        self.insert_node = c(insert(run_nodes).values({col.name: _p(col.name) for col in run_nodes.c}))
        self.find_key = read(select(run_nodes.c.id).where(run_nodes.c.idempotency_key == _p("key")))
        # inline(): no implicit RETURNING of the generated id, which nobody reads
        self.insert_work = c(insert(work).inline().values({col.name: _p(col.name) for col in work.c
                                                           if col.name != "id"}))
        self.drop_work = c(delete(work).where(work.c.node_id == _p("node_id")))
        self.drop_heartbeats = c(delete(work).where(and_(work.c.node_id == _p("node_id"),
                                                         work.c.kind == literal_column("'heartbeat'"))))
        self.finish_call = c(delete(work).where(and_(
            work.c.node_id == _p("node_id"), work.c.attempt == _p("attempt"), work.c.kind == _p("kind"))))
        self.renew_lease = alone(update(work).where(and_(
            work.c.node_id == _p("node_id"), work.c.attempt == _p("attempt"),
            work.c.kind == literal_column("'dispatch'"), work.c.lease_owner == _p("owner")))
            .values(lease_until=_p("until")))
        self.claim = alone(_claim_stmt(dialect))
        self.pending_call = read(select(work.c.due_at, work.c.lease_until).where(and_(
            work.c.node_id == _p("node_id"), work.c.attempt == _p("attempt"),
            work.c.kind == literal_column("'dispatch'"))))
        self.postpone = alone(update(work).where(and_(
            work.c.node_id == _p("node_id"), work.c.attempt == _p("attempt"), work.c.kind == _p("kind")))
            .values(due_at=_p("due_at"), lease_owner=null(), lease_until=null()))
        # The nodes of the calls just claimed: one statement on PostgreSQL, one cheap lookup each on SQLite.
        self.nodes_by_id = read(select(*NODE_COLUMNS).where(
            run_nodes.c.id == func.any(_p("ids")) if dialect == "postgresql" else run_nodes.c.id == _p("ids")))
        # When the next row becomes claimable: the earliest unleased due time or lease end (both indexed).
        unleased = select(func.min(work.c.due_at).label("at")).where(work.c.lease_until.is_(None))
        leased = select(func.min(work.c.lease_until).label("at"))
        both = union_all(unleased, leased).subquery()
        self.next_due = read(select(func.min(both.c.at)))
        self.insert_event = c(insert(events).inline().values({col.name: _p(col.name) for col in events.c
                                                              if col.name != "id"}))

        # GET /runs/{id}: only the columns the answer shows, for every node of the run the node belongs to.
        root = select(run_nodes.c.root_id).where(run_nodes.c.id == _p("node_id")).scalar_subquery()
        self.run_view = read(select(*VIEW_COLUMNS).where(run_nodes.c.root_id == root))
        # SQLite: the same nodes as JSON text written by the database (RUN_JSON_SQLITE); a run's root state.
        self.run_json = Sql(RUN_JSON_SQLITE, ("node_id",), {}, writes=False) if dialect == "sqlite" else None
        self.run_state = read(select(run_nodes.c.id, run_nodes.c.state).where(run_nodes.c.id == root))
        self.write_all: Sql | None = None
        self.load_chains: Sql | None = None
        self.count_children: Sql | None = None
        if dialect == "postgresql":
            self.count_children = Sql(COUNT_CHILDREN_PG, ("parent_ids", "positions", "now", "owner", "until"), {},
                                      alone=True)
            self.load_chains = read(_chains_stmt())
            self.write_all = Sql(WRITE_ALL_PG, WRITE_ALL_NAMES, {}, alone=True)
        self.drop_count = c(delete(work).where(and_(
            work.c.node_id == _p("parent_id"), work.c.attempt == _p("position"),
            work.c.kind == literal_column("'count'"))))
        def of_parent(column: Any) -> Any:
            return select(column).where(run_nodes.c.id == _p("parent_id")).scalar_subquery()

        self.bump_count = c(update(run_counters).where(run_counters.c.node_id == _p("parent_id"))
                            .values(done=run_counters.c.done + 1)
                            .returning(run_counters.c.done, of_parent(run_nodes.c.n_children),
                                       of_parent(run_nodes.c.root_id)))

    # ---- values to and from the driver ----

    def time_in(self, at: datetime | None) -> Any:
        """A timezone-aware datetime as the driver stores it (SQLite: naive UTC text, as SQLAlchemy writes it)."""
        if at is None:
            return None
        if self.dialect == "sqlite":
            return _sqlite_time(at)
        return at

    def time_out(self, value: Any) -> datetime | None:
        """A stored time as a timezone-aware UTC datetime."""
        if value is None:
            return None
        if isinstance(value, str):
            return _time_from_text(value)
        assert isinstance(value, datetime)
        if value.tzinfo is UTC:  # asyncpg's timestamptz
            return value
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)

    def node(self, row: Sequence[Any]) -> Node:
        """A Node from a row of NODE_COLUMNS."""
        (id_, root_id, parent_id, position, step_id, step_name, step_kind, step_version, config, mapper,
         n_children, state, input_, output, error, attempt, attempt_base, version, created_at, started_at,
         completed_at, _key) = row
        time_out = self.time_out
        return node_of({"id": id_, "root_id": root_id, "parent_id": parent_id, "position": position,
                        "step": _step(step_name, step_kind, config, step_id, step_version), "mapper": mapper,
                        "n_children": n_children, "created_at": time_out(created_at), "state": state,
                        "input": _json_out(input_), "output": _json_out(output), "error": _json_out(error),
                        "attempt": attempt, "attempt_base": attempt_base, "version": version,
                        "started_at": time_out(started_at), "completed_at": time_out(completed_at)})

    def view(self, row: Sequence[Any]) -> dict[str, Any]:
        """A node as the API shows it, from a row of VIEW_COLUMNS: stored JSON is passed through unparsed."""
        (id_, root_id, parent_id, position, step_id, step_name, step_kind, step_version, state, input_, output,
         error, attempt, version, created_at, started_at, completed_at) = row
        return {"id": id_, "root_id": root_id, "parent_id": parent_id, "position": position,
                "step": {"id": step_id, "name": step_name, "kind": step_kind, "version": step_version},
                "state": state, "input": _fragment(input_), "output": _fragment(output), "error": _fragment(error),
                "attempt": attempt, "version": version, "created_at": self._time_view(created_at),
                "started_at": self._time_view(started_at), "completed_at": self._time_view(completed_at)}

    def _time_view(self, value: Any) -> Any:
        # SQLite keeps "YYYY-MM-DD HH:MM:SS.ffffff" (UTC): written out as orjson writes an aware datetime.
        if isinstance(value, str):
            return f"{value[:10]}T{value[11:].removesuffix('.000000')}+00:00"
        return value

    def state_values(self, node: Node) -> dict[str, Any]:
        """The columns an event may change on a node, as driver values."""
        return {"state": node.state, "input": _json_in(node.input), "output": _json_in(node.output),
                "error": _json_in(node.error), "attempt": node.attempt, "attempt_base": node.attempt_base,
                "version": node.version, "started_at": self.time_in(node.started_at),
                "completed_at": self.time_in(node.completed_at)}

    def event_values(self, e: EventRecord) -> dict[str, Any]:
        """An events row."""
        return {"root_id": e.root_id, "node_id": e.node_id, "at": self.time_in(e.at), "kind": e.kind,
                "data": orjson.dumps(e.data).decode()}

    def work_values(self, w: Work, owner: str | None = None, until: datetime | None = None) -> dict[str, Any]:
        """A work row, leased to `owner` until `until` when it will be performed at once by this process."""
        return {"kind": w.kind, "node_id": w.node_id, "root_id": w.root_id, "attempt": w.attempt,
                "due_at": self.time_in(w.due_at), "lease_owner": owner, "lease_until": self.time_in(until)}


assert [c.name for c in NODE_COLUMNS] == [
    "id", "root_id", "parent_id", "position", "step_id", "step_name", "step_kind", "step_version", "config",
    "mapper", "n_children", "state", "input", "output", "error", "attempt", "attempt_base", "version",
    "created_at", "started_at", "completed_at", "idempotency_key"], "Statements.node unpacks these"


@functools.lru_cache(maxsize=1024)
def _sqlite_time(at: datetime) -> str:
    # An event writes one time many times over (its `now`, in each history line, work row and node).
    if at.tzinfo is not UTC:
        at = at.astimezone(UTC)
    return at.isoformat(sep=" ", timespec="microseconds")[:26]  # without its "+00:00"


@functools.lru_cache(maxsize=4096)
def _time_from_text(value: str) -> datetime:
    # A run's nodes share their created_at, and an event's changes their `now`.
    return datetime.fromisoformat(value).replace(tzinfo=UTC)


def _fragment(value: str | None) -> orjson.Fragment | None:
    return None if value is None else orjson.Fragment(value)


def _json_in(value: Any) -> str | None:
    return None if value is None else orjson.dumps(value).decode()


def _json_out(value: str | None) -> Any:
    return None if value is None else orjson.loads(value)


@functools.lru_cache(maxsize=4096)
def _step(name: str, kind: str, config: str, step_id: str, version: int) -> StepConfig:
    # Siblings of a wide parallel parent share one step: parse its config once, not once per child.
    return StepConfig.from_json(name, kind, orjson.loads(config), id=step_id, version=version)


# ---- step trees ----------------------------------------------------------------------------------------

# A step and everything under it, in one recursive query (trees reuse other trees: the union stops repeats).
TREE_SQL = text(
    "WITH RECURSIVE reach(id) AS ("
    " SELECT id FROM steps WHERE id = :key OR name = :key"
    " UNION SELECT sc.child_id FROM step_children sc JOIN reach r ON sc.parent_id = r.id)"
    " SELECT s.id, s.name, s.kind, s.config, s.version, sc.position, sc.child_id, sc.mapper"
    " FROM reach JOIN steps s ON s.id = reach.id LEFT JOIN step_children sc ON sc.parent_id = s.id"
)


def tree_from_rows(rows: Sequence[Sequence[Any]], key: str) -> StepTree | None:
    """The resolved tree of the step named (or with id) `key` from TREE_SQL's rows; None when there are none.

    The same rows give the same tree, built once: every start of a step reads its tree, and building it
    (configs parsed, children linked, the snapshot encoded) cost more than reading it. A changed step has a
    new version, so its rows differ.
    """
    if not rows:
        return None
    if len(rows) > CACHED_TREE_ROWS:  # a large run's start is its rows' insert: the tree is not worth the memory
        return _build_tree(rows, key)
    try:
        return _cached_tree(tuple(map(tuple, rows)), key)
    except TypeError:  # a config decoded to a dict (SQLAlchemy's JSON type): not hashable, build it afresh
        return _build_tree(rows, key)


CACHED_TREE_ROWS = 200  # step links of the largest tree kept built; 256 such trees are kept at most


@functools.lru_cache(maxsize=256)
def _cached_tree(rows: tuple[tuple[Any, ...], ...], key: str) -> StepTree:
    return _build_tree(rows, key)


def _build_tree(rows: Sequence[Sequence[Any]], key: str) -> StepTree:
    configs: dict[str, StepConfig] = {}
    links: dict[str, list[tuple[int, str, str | None]]] = {}
    root_id = None
    for step_id, name, kind, config, version, position, child_id, mapper in rows:
        if step_id not in configs:
            fields = config if isinstance(config, dict) else orjson.loads(config)
            configs[step_id] = StepConfig.from_json(name, kind, fields, id=step_id, version=version)
            links[step_id] = []
        if key in (step_id, name):
            root_id = step_id
        if child_id is not None:
            links[step_id].append((position, child_id, mapper))
    assert root_id is not None
    built: dict[str, StepTree] = {}

    def build(step_id: str) -> StepTree:
        if step_id not in built:
            kids = tuple((m, build(c)) for _, c, m in sorted(links[step_id]))
            built[step_id] = StepTree(configs[step_id], kids)
        return built[step_id]

    return build(root_id)


# ---- operations: what a backend executes -------------------------------------------------------------


@dataclass(frozen=True)
class Fetch:
    """Run a statement and answer its rows (tuples)."""

    sql: Sql
    values: dict[str, Any]


@dataclass(frozen=True)
class Exec:
    """Run a statement and answer the number of rows it changed."""

    sql: Sql
    values: dict[str, Any]


@dataclass(frozen=True)
class ExecMany:
    """Run a statement once per set of values (one round trip on PostgreSQL); answers nothing."""

    sql: Sql
    values: list[dict[str, Any]]


Op = Fetch | Exec | ExecMany


# ---- the store's own requests -------------------------------------------------------------------------


@dataclass(frozen=True)
class LoadTree:
    """Request: the resolved step tree of the step named (or with id) `key` (answer: StepTree or None)."""

    key: str


@dataclass(frozen=True)
class LoadChain:
    """Request: a node and all its ancestors, and its next sibling (answer: Chain)."""

    node_id: str


@dataclass(frozen=True)
class Chain:
    """A node and its ancestors (empty when there is no such node), and the node's next sibling if any."""

    nodes: list[Node]
    following: Node | None


@dataclass(frozen=True)
class Lease:
    """Work rows this process will perform right after the commit, leased to it until `until`.

    `keys` are (kind, node id, attempt) of the rows.
    """

    owner: str
    until: datetime
    keys: frozenset[tuple[str, str, int]]


@dataclass(frozen=True)
class Apply:
    """Request: write a plan — changed nodes under their read versions (Conflict otherwise), work, history."""

    plan: Plan
    lease: Lease | None = None
    new_run: InsertRun | None = None  # insert these nodes in their final state (the plan's nodes are not updated)
    finished: Sequence[FinishCall] = ()  # work rows performed meanwhile, deleted with the rest (records not written)


@dataclass(frozen=True)
class InsertRun:
    """A new run's nodes (in their started state), the root carrying the snapshot and key (see Apply)."""

    nodes: Sequence[Node]
    snapshot: str  # the step tree's JSON text (StepTree.snapshot_text)
    idempotency_key: str | None
    done_children: dict[str, int]


@dataclass(frozen=True)
class FindRunByKey:
    """Request: the run started with an idempotency key (answer: its id or None)."""

    key: str


@dataclass(frozen=True)
class FinishCall:
    """A work row was performed and needs nothing more: forget it, and record the answer when there is one."""

    node_id: str
    attempt: int
    kind: str = "dispatch"
    record: EventRecord | None = None


@dataclass(frozen=True)
class FinishCalls:
    """Request: several FinishCall at once."""

    calls: Sequence[FinishCall]


@dataclass(frozen=True)
class RenewLease:
    """Request: keep holding a dispatch row while its call still runs."""

    node_id: str
    attempt: int
    owner: str
    until: datetime


@dataclass(frozen=True)
class PendingCall:
    """Request: whether an attempt's call is still to be answered — its dispatch row is there — and when it will
    be made at the latest: when it is due, or when the lease of a process that may be making it ends (answer:
    that time, or None when the row is gone)."""

    node_id: str
    attempt: int


@dataclass(frozen=True)
class Postpone:
    """Request: move a work row to a later due time, and let go of its lease."""

    kind: str
    node_id: str
    attempt: int
    due_at: datetime


@dataclass(frozen=True)
class CountChild:
    """Request: count a parent's finished child once, deleting its `count` work row in the same statement.

    The count that reaches the parent's number of children also inserts a `complete` work row for the parent,
    leased to `owner` until `until`: completing the parent is then as durable as the count. Answer: True
    when this count was the last one.
    """

    parent_id: str
    position: int
    now: datetime
    owner: str
    until: datetime


@dataclass(frozen=True)
class ClaimedWork:
    """A work row this process holds the lease on, with its node when it is a call."""

    work: Work
    node: Node | None = None


@dataclass(frozen=True)
class Claim:
    """Request: lease up to `limit` due work rows nobody holds (answer: ClaimResult)."""

    owner: str
    now: datetime
    limit: int
    lease_s: float


@dataclass(frozen=True)
class ClaimResult:
    """The claimed work, and when the next row becomes claimable (None when there is none)."""

    claimed: list[ClaimedWork]
    next_due: datetime | None = None


Program = Generator[Any, Any, Any]  # yields the decide handlers' and this module's requests; returns the event's result


def single(request: Any) -> Program:
    """A program of one request."""
    return (yield request)


OpStream = Generator[Op | decide.RunScript, Any, Any]  # a lowered program


def lower(program: Program, st: Statements) -> OpStream:
    """A program's requests as operations; RunScript passes through to the backend, which calls the sandbox."""
    answer: Any = None
    while True:
        try:
            req = program.send(answer)
        except StopIteration as stop:
            return stop.value
        if isinstance(req, decide.RunScript):
            answer = yield req
        else:
            answer = yield from _ops(req, st)


def _ops(req: Any, st: Statements) -> Generator[Op, Any, Any]:
    if isinstance(req, LoadTree):
        return tree_from_rows((yield Fetch(st.load_tree, {"key": req.key})), req.key)
    if isinstance(req, LoadChain):
        rows = yield Fetch(st.load_chain, {"node_id": req.node_id})
        following = [st.node(r[1:]) for r in rows if r[0] == 1]
        return Chain([st.node(r[1:]) for r in rows if r[0] == 0], following[0] if following else None)
    if isinstance(req, decide.LoadChild):
        (row,) = yield Fetch(st.load_child, {"parent_id": req.parent_id, "position": req.position})
        return st.node(row)
    if isinstance(req, decide.LoadChildren):
        return [st.node(r) for r in (yield Fetch(st.load_children, {"parent_id": req.parent_id}))]
    if isinstance(req, decide.LoadSubtree):
        return [st.node(r) for r in (yield Fetch(st.load_subtree, {"node_id": req.node_id}))]
    if isinstance(req, decide.BumpDone):
        ((count,),) = yield Fetch(st.bump_done, {"parent_id": req.parent_id})
        return count
    if isinstance(req, decide.SetDone):
        yield Exec(st.set_done, {"parent_id": req.parent_id, "value": req.value})
        return None
    if isinstance(req, Apply):
        yield from _apply(req, st)
        return None
    if isinstance(req, FindRunByKey):
        rows = yield Fetch(st.find_key, {"key": req.key})
        return rows[0][0] if rows else None
    if isinstance(req, FinishCalls):
        if req.calls:
            plan = Plan(now=datetime.now(UTC), events=[c.record for c in req.calls if c.record is not None])
            yield from _apply(Apply(plan, finished=req.calls), st)
        return None
    if isinstance(req, RenewLease):
        yield Exec(st.renew_lease, {"node_id": req.node_id, "attempt": req.attempt, "owner": req.owner,
                                    "until": st.time_in(req.until)})
        return None
    if isinstance(req, Claim):
        return (yield from _claim(req, st))
    if isinstance(req, PendingCall):
        rows = yield Fetch(st.pending_call, {"node_id": req.node_id, "attempt": req.attempt})
        if not rows:
            return None
        times = [t for t in map(st.time_out, rows[0]) if t is not None]  # due_at, and lease_until when leased
        return max(times)
    if isinstance(req, Postpone):
        yield Exec(st.postpone, {"node_id": req.node_id, "attempt": req.attempt, "kind": req.kind,
                                 "due_at": st.time_in(req.due_at)})
        return None
    if isinstance(req, CountChild):
        values = {"parent_id": req.parent_id, "position": req.position, "now": st.time_in(req.now),
                  "owner": req.owner, "until": st.time_in(req.until)}
        if st.count_children is not None:  # PostgreSQL: one statement (a batch merges several, see postgres.py)
            rows = yield Fetch(st.count_children, {"parent_ids": [req.parent_id], "positions": [req.position],
                                                   "now": values["now"], "owner": req.owner, "until": values["until"]})
            return bool(rows)
        if (yield Exec(st.drop_count, values)) != 1:
            return False  # counted already
        ((done, n_children, root_id),) = yield Fetch(st.bump_count, values)
        if done != n_children:
            return False
        yield ExecMany(st.insert_work, [{"kind": "complete", "node_id": req.parent_id, "root_id": root_id,
                                         "attempt": 0, "due_at": values["now"], "lease_owner": req.owner,
                                         "lease_until": values["until"]}])
        return True
    raise TypeError(f"no SQL for request {req!r}")


def _new_run_rows(run: InsertRun, st: Statements) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """A new run's run_nodes rows and run_counters rows."""
    rows = []
    for n in run.nodes:
        rows.append({"id": n.id, "root_id": n.root_id, "parent_id": n.parent_id, "position": n.position,
                     "step_id": n.step.id, "step_name": n.step.name, "step_kind": n.step.kind,
                     "step_version": n.step.version, "config": n.step.fields_text,
                     "mapper": n.mapper, "n_children": n.n_children,
                     "created_at": st.time_in(n.created_at), "snapshot": None, "idempotency_key": None,
                     **st.state_values(n)})
    rows[0]["snapshot"] = run.snapshot
    rows[0]["idempotency_key"] = run.idempotency_key
    counters = [{"node_id": n.id, "done": run.done_children.get(n.id, 0)} for n in run.nodes if n.n_children]
    return rows, counters


def _apply(req: Apply, st: Statements) -> Generator[Op, Any, None]:
    plan = req.plan
    new_nodes, new_counters = _new_run_rows(req.new_run, st) if req.new_run is not None else ([], [])
    if new_nodes and st.write_all is None:
        yield ExecMany(st.insert_node, new_nodes)
        if new_counters:
            yield ExecMany(st.insert_counter, new_counters)
    # In id order, so that two events changing the same nodes lock them in the same order.
    changed = [] if req.new_run is not None else sorted(plan.changed, key=lambda n: n.id)
    node_rows = []
    for node in changed:
        values = st.state_values(node)
        values["k_id"] = node.id
        values["k_version"] = plan.loaded_versions[node.id]
        node_rows.append(values)
    if st.write_all is None:
        for values in node_rows:
            if (yield Exec(st.update_node, values)) != 1:
                raise Conflict(values["k_id"])
    drop = sorted(plan.drop_work_for)
    beats = sorted(plan.drop_heartbeats_for - plan.drop_work_for)
    # In node id order, like every other event's work rows: two transactions never wait on each other.
    finished = [{"node_id": c.node_id, "attempt": c.attempt, "kind": c.kind}
                for c in sorted(req.finished, key=lambda c: c.node_id) if c.node_id not in plan.drop_work_for]
    lease = req.lease
    work_rows = [st.work_values(w, lease.owner, lease.until)
                 if lease is not None and (w.kind, w.node_id, w.attempt) in lease.keys
                 else st.work_values(w) for w in plan.work]
    event_rows = [st.event_values(e) for e in plan.events]
    if st.write_all is not None:
        # PostgreSQL: every change of the event in one statement, one round trip. The node UPDATE is what the
        # statement's main query reads (it runs first, its rows locked in id order); the work and history
        # changes run after it. A node changed meanwhile aborts the whole statement (SerializationError).
        if node_rows or drop or beats or work_rows or event_rows or finished or new_nodes:
            values = {"drop": drop, "beats": beats, "expected": len(node_rows)}
            for group, rows in (("i_", new_nodes), ("c_", new_counters), ("n_", node_rows), ("w_", work_rows),
                                ("e_", event_rows), ("f_", finished)):
                if rows:
                    for key, name in _ARRAY_KEYS[group]:
                        values[key] = [r[name] for r in rows]
                else:  # most groups, most events: a new run's 23 columns are empty in every callback's write
                    values.update(_NO_ROWS[group])
            yield Fetch(st.write_all, values)
        return
    if drop:
        yield ExecMany(st.drop_work, [{"node_id": i} for i in drop])
    if beats:
        yield ExecMany(st.drop_heartbeats, [{"node_id": i} for i in beats])
    if work_rows:
        yield ExecMany(st.insert_work, work_rows)
    if event_rows:
        yield ExecMany(st.insert_event, event_rows)
    if finished:
        yield ExecMany(st.finish_call, finished)


def _claim(req: Claim, st: Statements) -> Generator[Op, Any, ClaimResult]:
    until = req.now + timedelta(seconds=req.lease_s)
    rows = yield Fetch(st.claim, {"now": st.time_in(req.now), "limit": req.limit, "owner": req.owner,
                                  "until": st.time_in(until)})
    nodes: dict[str, Node] = {}
    calls = [node_id for kind, node_id, *_ in rows if kind == "dispatch"]
    if calls and st.dialect == "postgresql":
        nodes = {n.id: n for n in map(st.node, (yield Fetch(st.nodes_by_id, {"ids": calls})))}
    else:
        for node_id in calls:
            nodes.update((n.id, n) for n in map(st.node, (yield Fetch(st.nodes_by_id, {"ids": node_id}))))
    claimed = [ClaimedWork(Work(kind, node_id, root_id, attempt, st.time_out(due_at)),  # type: ignore[arg-type]
                           nodes.get(node_id) if kind == "dispatch" else None)
               for kind, node_id, root_id, attempt, due_at in rows]
    if len(rows) == req.limit:
        return ClaimResult(claimed)  # the worker claims again at once: when the next row is due can wait
    ((due,),) = yield Fetch(st.next_due, {})
    return ClaimResult(claimed, st.time_out(due))
