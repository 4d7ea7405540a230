"""PostgreSQL's own statements: an event's writes as arrays in one statement, counts of children in one, the
chains of a batch of events in one, and claims that skip each other's rows."""

from __future__ import annotations

from dataclasses import replace
from typing import Any, ClassVar

from sqlalchemy import and_, func, literal_column, or_, select, union_all, update

from aetr.store.codec import NODE_COLUMNS, STATE_COLUMNS
from aetr.store.operations import DialectName, Sql
from aetr.store.statements import HANDING, PARKED, Statements, p, parent_kind
from aetr.store.tables import run_nodes, work

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
                        "holds_slot": "boolean", "notify": "text", "trace": "varchar",
                        }[c.name] for c in run_nodes.c)
_STATE_TYPES_PG = {"k_id": "varchar", "k_version": "integer", "state": "varchar", "input": "text", "output": "text",
                   "error": "text", "attempt": "integer", "attempt_base": "integer", "version": "integer",
                   "started_at": "timestamptz", "completed_at": "timestamptz", "n_children": "integer",
                   "wait_until": "timestamptz", "awaits_signal": "boolean", "holds_slot": "boolean"}
_WORK_TYPES_PG = {"kind": "varchar", "node_id": "varchar", "root_id": "varchar", "attempt": "integer",
                  "due_at": "timestamptz", "lease_owner": "varchar", "lease_until": "timestamptz"}
_EVENT_TYPES_PG = {"root_id": "varchar", "node_id": "varchar", "at": "timestamptz", "kind": "varchar", "data": "text"}
_OTHER_TYPES_PG = {"node_id": "varchar", "root_id": "varchar", "attempt": "integer", "kind": "varchar",
                   "at": "timestamptz", "old": "varchar", "new": "varchar"}  # the finished, slot, moved, counted rows
SLOT_FIELDS = ("old", "new", "attempt")  # a slot freed by node `old`, now held by attempt `attempt` of `new` (or none)
MOVED_FIELDS = ("node_id", "attempt", "kind", "at")  # a late call's deadline or heartbeat row, moved to `at`
COUNTER_NAMES = ("node_id", "done", "failed", "next_item", "items")
COUNTED_FIELDS = ("node_id", "root_id")  # a finished child counted by its parent (one row per child)
_COUNTER_TYPES_PG = ("varchar", "integer", "integer", "integer", "text")


def _rows(n: int, fields: tuple[str, ...], types: dict[str, str], alias: str = "v") -> str:
    """Parameter `$n`'s rows, a JSON array of objects, as a table with typed columns named as the keys."""
    return f"json_to_recordset(${n}::json) AS {alias}({', '.join(f'{f} {types[f]}' for f in fields)})"


def _write_all_pg() -> str:
    """The statement that writes an event's every change; its parameters are numbered in WRITE_ALL_NAMES's order.

    Each group of rows is one JSON parameter (a list of objects), not an array per column: asyncpg checks every
    element of an array against abstract base classes before encoding it (0.30 µs of the client's CPU an element,
    measured), where orjson writes the whole group at a few hundredths of that, and PostgreSQL's
    json_to_recordset reads it back at 0.18 µs more an element on the server's side (docs/performance.md).
    """
    p = {name: i for i, name in enumerate(WRITE_ALL_NAMES, start=1)}  # each parameter's $number
    work_ = _rows(p["w_"], WORK_FIELDS, _WORK_TYPES_PG)
    events_ = _rows(p["e_"], EVENT_FIELDS, _EVENT_TYPES_PG)
    nodes_ = _rows(p["n_"], NODE_FIELDS, _STATE_TYPES_PG)
    new_nodes = _rows(p["i_"], RUN_NODE_NAMES, dict(zip(RUN_NODE_NAMES, _NODE_TYPES_PG, strict=True)))
    new_counters = _rows(p["c_"], COUNTER_NAMES, dict(zip(COUNTER_NAMES, _COUNTER_TYPES_PG, strict=True)))
    finished_ = _rows(p["f_"], FINISHED_FIELDS, _OTHER_TYPES_PG, "f")
    slots_ = _rows(p["s_"], SLOT_FIELDS, _OTHER_TYPES_PG)
    moved_ = _rows(p["m_"], MOVED_FIELDS, _OTHER_TYPES_PG)
    counted_ = _rows(p["b_"], COUNTED_FIELDS, _OTHER_TYPES_PG, "c")
    sets = ", ".join(f"{c} = v.{c}" for c in STATE_COLUMNS)
    return (
        f"WITH dropped AS (DELETE FROM work WHERE node_id = ANY(${p['drop']}::varchar[])),"
        f" beats AS (DELETE FROM work WHERE kind = 'heartbeat' AND node_id = ANY(${p['beats']}::varchar[])),"
        f" added AS (INSERT INTO work ({', '.join(WORK_FIELDS)}) SELECT {', '.join(WORK_FIELDS)} FROM {work_}),"
        f" logged AS (INSERT INTO events ({', '.join(EVENT_FIELDS)}) SELECT {', '.join(EVENT_FIELDS)} FROM {events_}),"
        f" updated AS (UPDATE run_nodes AS n SET {sets} FROM {nodes_}"
        " WHERE n.id = v.k_id AND n.version = v.k_version RETURNING 1),"
        f" finished AS (DELETE FROM work AS w USING {finished_}"
        " WHERE w.node_id = f.node_id AND w.attempt = f.attempt AND w.kind = f.kind),"
        f" new_nodes AS (INSERT INTO run_nodes ({', '.join(RUN_NODE_NAMES)})"
        f" SELECT {', '.join(RUN_NODE_NAMES)} FROM {new_nodes}),"
        f" new_counters AS (INSERT INTO run_counters ({', '.join(COUNTER_NAMES)})"
        f" SELECT {', '.join(COUNTER_NAMES)} FROM {new_counters}),"
        # Slots freed by attempts that ended: free again, or held by the attempt they were handed to.
        " slots AS (UPDATE step_slots AS s SET holder_id = v.new, holder_attempt = v.attempt,"
        " taken_at = CASE WHEN v.new IS NULL THEN NULL ELSE now() END"
        f" FROM {slots_} WHERE s.holder_id = v.old),"
        # Calls made late: their deadlines count from the call (moved later, never earlier).
        " moved AS (UPDATE work AS w SET due_at = v.at"
        f" FROM {moved_}"
        " WHERE w.node_id = v.node_id AND w.attempt = v.attempt AND w.kind = v.kind AND w.due_at < v.at),"
        # Children that finished, counted by their parents: each parent's counter bumped once by its children
        # here, in parent order. A count that completes the set inserts the parent's `complete` row (leased to
        # this process, which completes the parent right after), and the parent is answered.
        " per AS (SELECT node_id, min(root_id) AS root_id, count(*) AS n"
        f" FROM {counted_} GROUP BY node_id ORDER BY node_id),"
        " bumped AS (UPDATE run_counters AS rc SET done = rc.done + per.n FROM per WHERE rc.node_id = per.node_id"
        " RETURNING rc.node_id, rc.done, per.root_id),"
        " last AS (INSERT INTO work (kind, node_id, root_id, attempt, due_at, lease_owner, lease_until)"
        f" SELECT 'complete', b.node_id, b.root_id, 0, ${p['b_due']}::timestamptz, ${p['b_owner']}::varchar,"
        f" ${p['b_until']}::timestamptz"
        " FROM bumped AS b JOIN run_nodes AS n ON n.id = b.node_id WHERE b.done = n.n_children RETURNING node_id)"
        # A node changed meanwhile: aetr_expect_rows (migration 0004) aborts the whole statement, which is atomic
        # by itself and so runs without BEGIN and COMMIT. The parents completed come after (an initplan, run
        # once the nodes are updated and counted).
        f" SELECT aetr_expect_rows(count(*), ${p['expected']}::integer), (SELECT array_agg(node_id) FROM last)"
        " FROM updated"
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
# write_all's groups of rows, each one JSON parameter: a new run's nodes, counters, the nodes updated, work rows
# added, history lines, calls finished, slots moved, deadlines moved, children counted. A group with no rows
# passes NULL, which json_to_recordset reads as no rows.
ROW_GROUPS = ("i_", "c_", "n_", "w_", "e_", "f_", "s_", "m_", "b_")
WRITE_ALL_NAMES = ("drop", "beats", "w_", "e_", "n_", "f_", "expected", "i_", "c_", "s_", "m_", "b_",
                   "b_due", "b_owner", "b_until")

# A slot row held by a node whose attempt does not hold it (its event failed or its process died between taking
# the slot and writing the node) is free again after this long: far longer than any event takes.
SLOT_ABANDONED_S = 60

# Take a free slot of a step for an attempt, in a statement of its own: it locks only the row it takes and skips
# rows other transactions hold, so takers of one step never wait for each other's commits. An event retried
# after a conflict finds the slot its first try took. Answers (slot already held, slot taken, rows made).
TAKE_SLOT_PG = (
    "WITH mine AS (SELECT slot FROM step_slots WHERE step_id = $1 AND holder_id = $3 AND holder_attempt = $4),"
    " free AS (SELECT s.slot FROM step_slots AS s WHERE s.step_id = $1 AND s.slot < $2"
    " AND NOT EXISTS (SELECT 1 FROM mine) AND (s.holder_id IS NULL"
    f" OR (s.taken_at < now() - interval '{SLOT_ABANDONED_S} seconds' AND NOT EXISTS (SELECT 1 FROM run_nodes AS n"
    " WHERE n.id = s.holder_id AND n.holds_slot AND n.attempt = s.holder_attempt)))"
    " ORDER BY s.slot LIMIT 1 FOR UPDATE SKIP LOCKED),"
    " taken AS (UPDATE step_slots AS s SET holder_id = $3, holder_attempt = $4, taken_at = now() FROM free"
    " WHERE s.step_id = $1 AND s.slot = free.slot RETURNING s.slot)"
    " SELECT (SELECT min(slot) FROM mine), (SELECT slot FROM taken),"
    " EXISTS (SELECT 1 FROM step_slots WHERE step_id = $1 AND slot = $2 - 1)"
)
# TAKE_SLOT_PG for several attempts of one step at once ($3 node ids, $4 attempts, distinct pairs): the events of
# a batch that take slots of one step share one statement, not one round trip each. Answers a row per attempt,
# in their order: (its place, slot already held, slot taken, rows made).
TAKE_SLOTS_PG = (
    "WITH req AS (SELECT r.node_id, r.attempt, r.ord FROM unnest($3::varchar[], $4::integer[]) WITH ORDINALITY"
    " AS r(node_id, attempt, ord)),"
    " mine AS (SELECT r.ord, min(s.slot) AS slot FROM req AS r JOIN step_slots AS s ON s.step_id = $1"
    " AND s.holder_id = r.node_id AND s.holder_attempt = r.attempt GROUP BY r.ord),"
    " want AS (SELECT r.ord, row_number() OVER (ORDER BY r.ord) AS k FROM req AS r"
    " WHERE NOT EXISTS (SELECT 1 FROM mine WHERE mine.ord = r.ord)),"
    " free AS (SELECT f.slot, row_number() OVER (ORDER BY f.slot) AS k FROM (SELECT s.slot FROM step_slots AS s"
    " WHERE s.step_id = $1 AND s.slot < $2 AND (s.holder_id IS NULL"
    f" OR (s.taken_at < now() - interval '{SLOT_ABANDONED_S} seconds' AND NOT EXISTS (SELECT 1 FROM run_nodes AS n"
    " WHERE n.id = s.holder_id AND n.holds_slot AND n.attempt = s.holder_attempt)))"
    " ORDER BY s.slot LIMIT (SELECT count(*) FROM want) FOR UPDATE SKIP LOCKED) AS f),"
    " taken AS (UPDATE step_slots AS s SET holder_id = r.node_id, holder_attempt = r.attempt, taken_at = now()"
    " FROM free JOIN want ON want.k = free.k JOIN req AS r ON r.ord = want.ord"
    " WHERE s.step_id = $1 AND s.slot = free.slot RETURNING want.ord, s.slot)"
    " SELECT r.ord, mine.slot, taken.slot, EXISTS (SELECT 1 FROM step_slots WHERE step_id = $1 AND slot = $2 - 1)"
    " FROM req AS r LEFT JOIN mine ON mine.ord = r.ord LEFT JOIN taken ON taken.ord = r.ord ORDER BY r.ord"
)
# A step's slot rows up to its limit, made the first time an attempt finds them missing.
MAKE_SLOTS_PG = ("INSERT INTO step_slots (step_id, slot) SELECT $1, g FROM generate_series(0, $2 - 1) AS g"
                 " ON CONFLICT DO NOTHING")
# Run after a commit that set attempts aside, or freed slots it could not hand on: as many of the step's attempts
# that waited longest as it has free slots (up to $3) are made claimable at once. An attempt set aside while
# another event freed a slot without seeing it is found this way by one of the two, whichever commits last.
WAKE_WAITERS_PG = (
    "UPDATE work SET lease_owner = NULL, lease_until = NULL WHERE id IN (SELECT w.id FROM work AS w"
    " JOIN run_nodes AS n ON n.id = w.node_id WHERE w.kind = 'queued' AND n.step_id = $1 AND w.attempt = n.attempt"
    f" AND w.lease_owner = '{PARKED}' ORDER BY w.due_at"
    " LIMIT least($3::integer,"
    " (SELECT count(*) FROM step_slots WHERE step_id = $1 AND slot < $2 AND holder_id IS NULL))"
    " FOR UPDATE OF w SKIP LOCKED)"
)


def _waiting_for_a_slot(w: Any, n: Any, step_id: Any, now: Any) -> Any:
    """Work rows `w` (joined to their nodes `n`) of attempts of `step_id` waiting for a slot and claimable at
    `now`: queued for their current attempt, due, and set aside, never leased, or their lease over."""
    return and_(w.c.kind == literal_column("'queued'"), n.c.step_id == step_id, w.c.attempt == n.c.attempt,
                w.c.due_at <= now, or_(w.c.lease_owner.is_(None), w.c.lease_owner == literal_column(f"'{PARKED}'"),
                                       w.c.lease_until < now))


def claim_waiting_stmt() -> Any:
    """The attempts of a step that have waited longest for a slot, claimed for the event handing them freed
    slots (their rows leased to HANDING for a moment): two events freeing slots at once hand them to different
    attempts, without a lock between them."""
    pick = (select(work.c.id).select_from(work.join(run_nodes, run_nodes.c.id == work.c.node_id))
            .where(_waiting_for_a_slot(work, run_nodes, p("step_id"), p("now")),
                   ~(work.c.node_id == func.any(p("besides"))))
            .order_by(work.c.due_at).limit(p("count")).with_for_update(of=work, skip_locked=True).cte("pick"))
    claimed = (update(work).where(work.c.id == pick.c.id)
               .values(lease_owner=literal_column(f"'{HANDING}'"), lease_until=p("until"))
               .returning(work.c.node_id).cte("claimed"))
    return select(*NODE_COLUMNS).where(run_nodes.c.id.in_(select(claimed.c.node_id)))


def chains_stmt() -> Any:
    """PostgreSQL: _chain_stmt for several nodes at once (an array `ids`), each row led by the nodes it is for.

    A node in the chains of several (a map's node, a wide parallel's, their root) is one row for all of them:
    its input (a map's is its whole list of items) is read, sent and parsed once a batch, not once an event.
    """
    step = run_nodes.alias("step")
    chain = (select(run_nodes.c.id.label("start"), run_nodes.c.id, run_nodes.c.parent_id)
             .where(run_nodes.c.id == func.any(p("ids"))).cte("chain", recursive=True))
    chain = chain.union_all(select(chain.c.start, step.c.id, step.c.parent_id)
                            .join(chain, step.c.id == chain.c.parent_id))
    me, sib = run_nodes.alias("me"), run_nodes.alias("sib")
    following = (select(func.array_agg(me.c.id).label("starts"), literal_column("1").label("extra"),
                        *[sib.c[c.name] for c in NODE_COLUMNS])
                 .join(me, and_(sib.c.parent_id == me.c.parent_id, sib.c.position == me.c.position + 1))
                 .where(me.c.id == func.any(p("ids"))).where(parent_kind(me) == "sequential").group_by(sib.c.id))
    ancestors = (select(func.array_agg(chain.c.start).label("starts"), literal_column("0").label("extra"),
                        *NODE_COLUMNS)
                 .join(chain, run_nodes.c.id == chain.c.id).group_by(run_nodes.c.id))
    return union_all(ancestors, following)


def chains_claiming_stmt() -> Any:
    """chains_stmt, and for the nodes `ends` of those whose events end an attempt holding a slot, as many of the
    step's longest-waiting attempts claimed as those nodes hold slots (claim_waiting's claim, leased to HANDING
    until `until`): the events that free slots find the attempts to hand them to with the chain they read, not
    in a round trip of their own. The claimed nodes are rows with `extra` 2 and no `starts`."""
    holder, w, n = run_nodes.alias("holder"), work.alias("w"), run_nodes.alias("n")
    held = (select(holder.c.step_id, func.count().label("n"))
            .where(holder.c.id == func.any(p("ends")), holder.c.holds_slot, holder.c.state == "executing")
            .group_by(holder.c.step_id).cte("held"))
    pick = (select(w.c.id).select_from(w.join(n, n.c.id == w.c.node_id))
            .where(_waiting_for_a_slot(w, n, held.c.step_id, p("now")))
            .order_by(w.c.due_at).limit(held.c.n).with_for_update(of=w, skip_locked=True).lateral("pick"))
    picked = select(pick.c.id).select_from(held).join(pick, literal_column("true")).cte("picked")
    claimed = (update(work).where(work.c.id.in_(select(picked.c.id)))
               .values(lease_owner=literal_column(f"'{HANDING}'"), lease_until=p("until"))
               .returning(work.c.node_id).cte("claimed"))
    waiting = (select(literal_column("ARRAY[]::varchar[]").label("starts"), literal_column("2").label("extra"),
                      *NODE_COLUMNS).where(run_nodes.c.id.in_(select(claimed.c.node_id))))
    return union_all(*chains_stmt().selects, waiting)


# Claimed with a chain (chains_claiming_stmt) and not handed a slot after all (the event was refused, or went on
# alone): waiting again, as before the claim; and made claimable at once where a slot is free (WAKE_WAITERS_PG).
UNCLAIM_PG = (f"UPDATE work SET lease_owner = '{PARKED}', lease_until = NULL WHERE kind = 'queued'"
              f" AND node_id = ANY($1::varchar[]) AND lease_owner = '{HANDING}' AND lease_until = $2::timestamptz")


class PostgresStatements(Statements):
    """Statements for PostgreSQL (asyncpg)."""

    dialect: ClassVar[DialectName] = "postgresql"

    def __init__(self) -> None:
        super().__init__()
        self.count_children = Sql(COUNT_CHILDREN_PG, ("parent_ids", "positions", "now", "owner", "until"), {},
                                  alone=True)
        self.load_chains = self.read(chains_stmt())
        self.load_chains_claiming = self.read(chains_claiming_stmt())
        self.unclaim = Sql(UNCLAIM_PG, ("node_ids", "until"), {}, writes=False)
        self.write_all = Sql(_write_all_pg(), WRITE_ALL_NAMES, {}, alone=True, as_json=ROW_GROUPS)
        # Slots as rows (step_slots). Each of these commits on its own when the event has no transaction open
        # yet (writes=False: it never opens one), so the rows it locks are free again at once.
        self.take_slot = Sql(TAKE_SLOT_PG, ("step_id", "limit", "node_id", "attempt"), {}, writes=False)
        self.take_slots = Sql(TAKE_SLOTS_PG, ("step_id", "limit", "node_ids", "attempts"), {}, writes=False)
        self.make_slots = Sql(MAKE_SLOTS_PG, ("step_id", "limit"), {}, writes=False)
        self.wake_waiters = Sql(WAKE_WAITERS_PG, ("step_id", "limit", "count"), {}, writes=False)
        self.claim_waiting = replace(self.read(claim_waiting_stmt()), writes=False)
        # Setting an attempt aside commits by itself too: the check for a slot freed meanwhile follows it.
        self.park = replace(self.park, writes=False)

    def claimable(self, ids: Any) -> Any:
        return ids.with_for_update(skip_locked=True)  # two processes claiming at once skip each other's rows

    def ids_match(self) -> Any:
        return run_nodes.c.id == func.any(p("ids"))  # every claimed call's node in one statement
