"""Every statement an event sends, built once with SQLAlchemy Core and compiled once per dialect.

`Statements` holds what both databases run alike, and decodes their rows (it is the RowCodec). Each backend's
subclass (aetr.store.postgres_sql, aetr.store.sqlite_sql) overrides only what must differ, and adds the
statements only it has; aetr.store.lowering decides which statements an event's requests send.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, ClassVar

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
    true,
    union_all,
    update,
)

from aetr.store.codec import NODE_COLUMNS, STATE_COLUMNS, RowCodec
from aetr.store.operations import DialectName, Sql, compile_sql
from aetr.store.step_trees import TREE_SQL
from aetr.store.tables import events, run_counters, run_nodes, work
from aetr.store.views import VIEW_COLUMNS

PARKED = "aetr:waiting-for-a-slot"  # the lease owner of a queued attempt set aside until a slot frees
HANDING = "aetr:handing-a-slot"  # PostgreSQL: the lease owner of a queued attempt an event hands a freed slot to
HANDING_S = 5.0  # how long that claim lasts: the event's commit ends it, or (the event failed) the lease's end
WORK_RETURNED = (work.c.kind, work.c.node_id, work.c.root_id, work.c.attempt, work.c.due_at)


def p(name: str) -> Any:
    """A named parameter."""
    return bindparam(name)


def next_due_query() -> Any:
    """When the next row becomes claimable: the first unleased due time and the first lease end, one row of
    ix_work_lease each. (min(due_at) over the unleased rows is planned on ix_work_due by PostgreSQL, which then
    walks every leased row due earlier: with 30,000 calls in flight, hundreds of pages per claim.)"""
    unleased = (select(work.c.due_at).where(work.c.lease_until.is_(None))
                .order_by(work.c.lease_until, work.c.due_at).limit(1))
    leased = (select(work.c.lease_until).where(work.c.lease_until.is_not(None))
              .order_by(work.c.lease_until).limit(1))
    return select(unleased.scalar_subquery(), leased.scalar_subquery())


def chain_stmt() -> Any:
    """A node and its ancestors (first column 0), and the node's next sibling (first column 1), in one query.

    The sibling is what a sequential parent starts next; reading it here saves that event a round trip. A
    parallel parent's children need no sibling, so none is read for them (a fan-out's callbacks decode a node
    fewer each).
    """
    step = run_nodes.alias("step")
    chain = select(run_nodes.c.id, run_nodes.c.parent_id).where(run_nodes.c.id == p("node_id")).cte(
        "chain", recursive=True)
    chain = chain.union_all(select(step.c.id, step.c.parent_id).join(chain, step.c.id == chain.c.parent_id))
    me, sib = run_nodes.alias("me"), run_nodes.alias("sib")
    following = (select(literal_column("1").label("extra"), *[sib.c[c.name] for c in NODE_COLUMNS])
                 .join(me, and_(sib.c.parent_id == me.c.parent_id, sib.c.position == me.c.position + 1))
                 .where(me.c.id == p("node_id")).where(parent_kind(me) == "sequential"))
    ancestors = select(literal_column("0").label("extra"), *NODE_COLUMNS).join(chain, run_nodes.c.id == chain.c.id)
    return union_all(ancestors, following)


def parent_kind(me: Any) -> Any:
    """The kind of `me`'s parent, as a subquery per row of `me`.

    Not a join: as a join, a plan made while the tables were nearly empty (a generic plan, made once per
    connection) started from the parents — every sequential node of the database, filtered by kind — and only
    then looked for the nodes asked about. PostgreSQL spent 8-15 ms on each batch of chains that way, most of
    its CPU in the throughput scenario, and more as the table grew. As a subquery it can only be evaluated for
    the nodes asked about.
    """
    parent = run_nodes.alias("parent")
    return select(parent.c.step_kind).where(parent.c.id == me.c.parent_id).scalar_subquery()


def _subtree_stmt() -> Any:
    kid = run_nodes.alias("kid")
    sub = select(run_nodes.c.id).where(run_nodes.c.id == p("node_id")).cte("sub", recursive=True)
    sub = sub.union_all(select(kid.c.id).join(sub, kid.c.parent_id == sub.c.id))
    return select(*NODE_COLUMNS).join(sub, run_nodes.c.id == sub.c.id)


class Statements(RowCodec):
    """Every statement the hot path sends, compiled for one dialect (a subclass per backend)."""

    dialect: ClassVar[DialectName]
    # Only some backends have these (None otherwise): see each backend's subclass.
    write_all: Sql | None = None  # an event's every write in one statement
    load_chains: Sql | None = None  # load_chain for several nodes at once
    load_chains_claiming: Sql | None = None  # the same, claiming waiting attempts for the slots events free
    unclaim: Sql | None = None  # the attempts load_chains_claiming claimed and no event was handed: waiting again
    count_children: Sql | None = None  # CountChild in one statement
    run_json: Sql | None = None  # GET /runs's nodes as JSON text written by the database

    def compiled(self, stmt: Any) -> Sql:
        """A write statement compiled for this dialect."""
        return compile_sql(stmt, self.dialect)

    def read(self, stmt: Any) -> Sql:
        """A read statement (it never opens a transaction) compiled for this dialect."""
        return replace(self.compiled(stmt), writes=False)

    def alone(self, stmt: Any) -> Sql:
        """A write statement atomic by itself (see Sql.alone) compiled for this dialect."""
        return replace(self.compiled(stmt), alone=True)

    # ---- what the backends override ----

    def claimable(self, ids: Any) -> Any:
        """The query of the work rows a claim takes (PostgreSQL: skipping rows another claim has locked)."""
        return ids

    def ids_match(self) -> Any:
        """The condition on run_nodes.id for nodes_by_id, whose parameter `ids` is one id (or several)."""
        return run_nodes.c.id == p("ids")

    def __init__(self) -> None:
        c, read, alone = self.compiled, self.read, self.alone
        self.load_tree = read(TREE_SQL)
        self.load_chain = read(chain_stmt())
        self.load_subtree = read(_subtree_stmt())
        self.load_children = read(select(*NODE_COLUMNS).where(run_nodes.c.parent_id == p("parent_id"))
                                  .order_by(run_nodes.c.position))
        self.load_child = read(select(*NODE_COLUMNS).where(
            and_(run_nodes.c.parent_id == p("parent_id"), run_nodes.c.position == p("position"))))
        self.bump_done = c(update(run_counters).where(run_counters.c.node_id == p("parent_id"))
                           .values(done=run_counters.c.done + 1).returning(run_counters.c.done))
        self.set_done = c(update(run_counters).where(run_counters.c.node_id == p("parent_id"))
                          .values(done=p("value"), failed=p("failed"), next_item=p("next_item")))
        self.bump_failed = c(update(run_counters).where(run_counters.c.node_id == p("parent_id"))
                             .values(failed=run_counters.c.failed + 1).returning(run_counters.c.failed))
        self.next_item = c(update(run_counters).where(run_counters.c.node_id == p("parent_id"))
                           .values(next_item=run_counters.c.next_item + 1).returning(run_counters.c.next_item))
        self.insert_counter = c(insert(run_counters).values(node_id=p("node_id"), done=p("done"), failed=p("failed"),
                                                            next_item=p("next_item"), items=p("items")))
        self.keep_items = c(update(run_counters).where(run_counters.c.node_id == p("node_id"))
                            .values({"items": p("items")}))
        self.load_items = read(select(run_counters.c["items"]).where(run_counters.c.node_id == p("node_id")))
        # Read under the row's lock, as an UPDATE: an event taking the next item waits for this one's commit.
        self.read_next_item = c(update(run_counters).where(run_counters.c.node_id == p("node_id"))
                                .values(next_item=run_counters.c.next_item).returning(run_counters.c.next_item))
        self.update_node = c(update(run_nodes)
                             .where(and_(run_nodes.c.id == p("k_id"), run_nodes.c.version == p("k_version")))
                             .values({name: p(name) for name in STATE_COLUMNS}))
        self.insert_node = c(insert(run_nodes).values({col.name: p(col.name) for col in run_nodes.c}))
        self.find_key = read(select(run_nodes.c.id).where(run_nodes.c.idempotency_key == p("key")))
        # inline(): no implicit RETURNING of the generated id, which nobody reads
        self.insert_work = c(insert(work).inline().values({col.name: p(col.name) for col in work.c
                                                           if col.name != "id"}))
        self.drop_work = c(delete(work).where(work.c.node_id == p("node_id")))
        self.drop_heartbeats = c(delete(work).where(and_(work.c.node_id == p("node_id"),
                                                         work.c.kind == literal_column("'heartbeat'"))))
        self.finish_call = c(delete(work).where(and_(
            work.c.node_id == p("node_id"), work.c.attempt == p("attempt"), work.c.kind == p("kind"))))
        self.renew_lease = alone(update(work).where(and_(
            work.c.node_id == p("node_id"), work.c.attempt == p("attempt"),
            work.c.kind == literal_column("'dispatch'"), work.c.lease_owner == p("owner")))
            .values(lease_until=p("until")))
        due = or_(work.c.lease_until.is_(None), work.c.lease_until < p("now"))
        ids = self.claimable(select(work.c.id).where(work.c.due_at <= p("now")).where(due)
                             .order_by(work.c.due_at).limit(p("limit")))
        self.claim = alone(update(work).where(work.c.id.in_(ids.scalar_subquery()))
                           .values(lease_owner=p("owner"), lease_until=p("until")).returning(*WORK_RETURNED))
        self.pending_call = read(select(work.c.due_at, work.c.lease_until).where(and_(
            work.c.node_id == p("node_id"), work.c.attempt == p("attempt"),
            work.c.kind == literal_column("'dispatch'"))))
        self.work_due = read(select(work.c.due_at).where(and_(
            work.c.node_id == p("node_id"), work.c.attempt == p("attempt"), work.c.kind == p("kind"))))
        # A late call's deadlines count from the call: moved later, never earlier.
        self.move_deadline = c(update(work).where(and_(
            work.c.node_id == p("node_id"), work.c.attempt == p("attempt"), work.c.kind == p("kind"),
            work.c.due_at < p("at"))).values(due_at=p("at")))
        self.postpone = alone(update(work).where(and_(
            work.c.node_id == p("node_id"), work.c.attempt == p("attempt"), work.c.kind == p("kind")))
            .values(due_at=p("due_at"), lease_owner=null(), lease_until=null()))
        # Slots of a step with max_concurrency, on SQLite (one writer at a time): the nodes whose current attempt
        # holds one, counted (a partial index finds them). PostgreSQL has slot rows instead (postgres_sql).
        self.take_slot: Sql | None = None
        self.take_slots: Sql | None = None  # take_slot for several attempts of one step in one statement
        self.make_slots: Sql | None = None
        self.wake_waiters: Sql | None = None
        self.claim_waiting: Sql | None = None
        self.count_slots = read(select(func.count()).select_from(run_nodes).where(and_(
            run_nodes.c.step_id == p("step_id"), run_nodes.c.holds_slot == true())))
        self.park = c(update(work).where(and_(
            work.c.node_id == p("node_id"), work.c.attempt == p("attempt"), work.c.kind == literal_column("'queued'")))
            .values(lease_owner=literal_column(f"'{PARKED}'"), lease_until=p("until")))
        # The attempts that have waited longest for a slot of a step (the one freed goes to the first).
        self.next_waiting = read(
            select(*NODE_COLUMNS).select_from(work.join(run_nodes, run_nodes.c.id == work.c.node_id))
            .where(and_(work.c.kind == literal_column("'queued'"), run_nodes.c.step_id == p("step_id"),
                        work.c.attempt == run_nodes.c.attempt, work.c.due_at <= p("now")))
            .order_by(work.c.due_at).limit(p("count")))
        # The nodes of the calls just claimed: one statement on PostgreSQL, one cheap lookup each on SQLite.
        self.nodes_by_id = read(select(*NODE_COLUMNS).where(self.ids_match()))
        self.next_due = read(next_due_query())
        # A notification's try, recorded by the process holding its row's lease: kept for a later try, or forgotten.
        notifying = and_(work.c.node_id == p("node_id"), work.c.attempt == p("attempt"),
                         work.c.kind == literal_column("'notify'"), work.c.lease_owner == p("owner"))
        self.notify_again = c(update(work).where(notifying).values(
            attempt=work.c.attempt + 1, due_at=p("due_at"), lease_owner=null(), lease_until=null()))
        self.notify_done = c(delete(work).where(notifying))
        self.insert_event = c(insert(events).inline().values({col.name: p(col.name) for col in events.c
                                                              if col.name != "id"}))

        # GET /runs/{id}: only the columns the answer shows, for every node of the run the node belongs to.
        root = select(run_nodes.c.root_id).where(run_nodes.c.id == p("node_id")).scalar_subquery()
        self.run_view = read(select(*VIEW_COLUMNS).where(run_nodes.c.root_id == root))
        self.run_state = read(select(run_nodes.c.id, run_nodes.c.state).where(run_nodes.c.id == root))
        self.drop_count = c(delete(work).where(and_(
            work.c.node_id == p("parent_id"), work.c.attempt == p("position"),
            work.c.kind == literal_column("'count'"))))

        def of_parent(column: Any) -> Any:
            return select(column).where(run_nodes.c.id == p("parent_id")).scalar_subquery()

        self.bump_count = c(update(run_counters).where(run_counters.c.node_id == p("parent_id"))
                            .values(done=run_counters.c.done + 1)
                            .returning(run_counters.c.done, of_parent(run_nodes.c.n_children),
                                       of_parent(run_nodes.c.root_id)))
