"""PostgreSQL's own statements: an event's writes as arrays in one statement, counts of children in one, the
chains of a batch of events in one, and claims that skip each other's rows."""

from __future__ import annotations

from typing import Any, ClassVar

from sqlalchemy import and_, func, literal_column, select, union_all

from aetr.store.codec import NODE_COLUMNS, STATE_COLUMNS
from aetr.store.operations import DialectName, Sql
from aetr.store.statements import Statements, p, parent_kind
from aetr.store.tables import run_nodes

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
                        "idempotency_key": "varchar", "wait_until": "timestamptz", "awaits_signal": "boolean",
                        "holds_slot": "boolean", "notify": "text",
                        }[c.name] for c in run_nodes.c)
_STATE_TYPES_PG = {"k_id": "varchar", "k_version": "integer", "state": "varchar", "input": "text", "output": "text",
                   "error": "text", "attempt": "integer", "attempt_base": "integer", "version": "integer",
                   "started_at": "timestamptz", "completed_at": "timestamptz", "n_children": "integer",
                   "wait_until": "timestamptz", "awaits_signal": "boolean", "holds_slot": "boolean"}
COUNTER_NAMES = ("node_id", "done", "failed", "next_item", "items")
_COUNTER_TYPES_PG = ("varchar", "integer", "integer", "integer", "text")


def _write_all_pg() -> str:
    """The statement that writes an event's every change; its parameters are numbered in WRITE_ALL_NAMES's order."""
    n = iter(range(1, 1000))

    def arrays(types: tuple[str, ...] | list[str]) -> str:
        return ", ".join(f"${next(n)}::{t}[]" for t in types)

    drop, beats = next(n), next(n)
    work_ = arrays(["varchar", "varchar", "varchar", "integer", "timestamptz", "varchar", "timestamptz"])
    events_ = arrays(["varchar", "varchar", "timestamptz", "varchar", "text"])
    nodes_ = arrays([_STATE_TYPES_PG[f] for f in NODE_FIELDS])
    finished_ = arrays(["varchar", "integer", "varchar"])
    expected = next(n)
    new_nodes = arrays(list(_NODE_TYPES_PG))
    new_counters = arrays(list(_COUNTER_TYPES_PG))
    sets = ", ".join(f"{c} = v.{c}" for c in STATE_COLUMNS)
    return (
        f"WITH dropped AS (DELETE FROM work WHERE node_id = ANY(${drop}::varchar[])),"
        f" beats AS (DELETE FROM work WHERE kind = 'heartbeat' AND node_id = ANY(${beats}::varchar[])),"
        " added AS (INSERT INTO work (kind, node_id, root_id, attempt, due_at, lease_owner, lease_until)"
        f" SELECT * FROM unnest({work_})),"
        f" logged AS (INSERT INTO events (root_id, node_id, at, kind, data) SELECT * FROM unnest({events_})),"
        f" updated AS (UPDATE run_nodes AS n SET {sets} FROM unnest({nodes_}) AS v(id, {', '.join(NODE_FIELDS[1:])})"
        " WHERE n.id = v.id AND n.version = v.k_version RETURNING 1),"
        f" finished AS (DELETE FROM work AS w USING unnest({finished_}) AS f(node_id, attempt, kind)"
        " WHERE w.node_id = f.node_id AND w.attempt = f.attempt AND w.kind = f.kind),"
        f" new_nodes AS (INSERT INTO run_nodes ({', '.join(c.name for c in run_nodes.c)})"
        f" SELECT * FROM unnest({new_nodes})),"
        f" new_counters AS (INSERT INTO run_counters ({', '.join(COUNTER_NAMES)}) SELECT * FROM unnest({new_counters}))"
        # A node changed meanwhile: aetr_expect_rows (migration 0004) aborts the whole statement, which is atomic
        # by itself and so runs without BEGIN and COMMIT.
        f" SELECT aetr_expect_rows(count(*), ${expected}::integer) FROM updated"
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
ARRAY_KEYS = {prefix: tuple((prefix + name, name) for name in names) for prefix, names in (
    ("i_", RUN_NODE_NAMES), ("c_", COUNTER_NAMES), ("n_", NODE_FIELDS), ("w_", WORK_FIELDS), ("e_", EVENT_FIELDS),
    ("f_", FINISHED_FIELDS))}
NO_ROWS: dict[str, dict[str, tuple[()]]] = {prefix: {key: () for key, _ in keys}
                                             for prefix, keys in ARRAY_KEYS.items()}
WRITE_ALL_NAMES = ("drop", "beats", *(f"w_{k}" for k in WORK_FIELDS), *(f"e_{k}" for k in EVENT_FIELDS),
                   *(f"n_{k}" for k in NODE_FIELDS), *(f"f_{k}" for k in FINISHED_FIELDS), "expected",
                   *(f"i_{name}" for name in RUN_NODE_NAMES), *(f"c_{name}" for name in COUNTER_NAMES))


def chains_stmt() -> Any:
    """PostgreSQL: _chain_stmt for several nodes at once (an array `ids`), each row led by the node it is for."""
    step = run_nodes.alias("step")
    chain = (select(run_nodes.c.id.label("start"), run_nodes.c.id, run_nodes.c.parent_id)
             .where(run_nodes.c.id == func.any(p("ids"))).cte("chain", recursive=True))
    chain = chain.union_all(select(chain.c.start, step.c.id, step.c.parent_id)
                            .join(chain, step.c.id == chain.c.parent_id))
    me, sib = run_nodes.alias("me"), run_nodes.alias("sib")
    following = (select(me.c.id.label("start"), literal_column("1").label("extra"),
                        *[sib.c[c.name] for c in NODE_COLUMNS])
                 .join(me, and_(sib.c.parent_id == me.c.parent_id, sib.c.position == me.c.position + 1))
                 .where(me.c.id == func.any(p("ids"))).where(parent_kind(me) == "sequential"))
    ancestors = (select(chain.c.start, literal_column("0").label("extra"), *NODE_COLUMNS)
                 .join(chain, run_nodes.c.id == chain.c.id))
    return union_all(ancestors, following)


class PostgresStatements(Statements):
    """Statements for PostgreSQL (asyncpg)."""

    dialect: ClassVar[DialectName] = "postgresql"
    # write_all's array parameters by group: (parameter, column of the group's rows); and each group with no rows.
    array_keys = ARRAY_KEYS
    no_rows = NO_ROWS

    def __init__(self) -> None:
        super().__init__()
        self.count_children = Sql(COUNT_CHILDREN_PG, ("parent_ids", "positions", "now", "owner", "until"), {},
                                  alone=True)
        self.load_chains = self.read(chains_stmt())
        self.write_all = Sql(_write_all_pg(), WRITE_ALL_NAMES, {}, alone=True)
        # Takers and releasers of one step's slots, one at a time across processes, until their commits.
        self.slot_lock = Sql("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))", ("step_id",), {})

    def claimable(self, ids: Any) -> Any:
        return ids.with_for_update(skip_locked=True)  # two processes claiming at once skip each other's rows

    def ids_match(self) -> Any:
        return run_nodes.c.id == func.any(p("ids"))  # every claimed call's node in one statement
