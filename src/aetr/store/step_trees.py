"""Step trees: reading one resolved (once per version: see tree_from_rows), and storing a change to them with
its checks (references, If-Match, cycles, depth, size), inside the change's transaction."""

from __future__ import annotations

import functools
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson
from sqlalchemy import bindparam, delete, insert, select, text, update
from sqlalchemy.ext.asyncio import AsyncConnection

from aetr.domain.jsonvalue import MAX_TREE_DEPTH
from aetr.domain.steps import CycleError, StepConfig, StepDef, StepTree, TreeTooBig, find_cycle, first_oversized
from aetr.store.errors import StepsRefused
from aetr.store.tables import UTCDateTime, step_children, steps

CHUNK = 500  # rows per IN (...) list: well under SQLite's bound-parameter limit


# A step and everything under it, in one recursive query (trees reuse other trees: the union stops repeats). The
# step is looked up by id and by name as two indexed reads: `id = :key OR name = :key` needs a bitmap scan to use
# both indexes, which PostgreSQL's events sessions do not make (see EVENTS_SESSION), and scanned every step.
TREE_SQL = text(
    "WITH RECURSIVE reach(id) AS ("
    " SELECT id FROM (SELECT id FROM steps WHERE id = :key UNION ALL SELECT id FROM steps WHERE name = :key) AS k"
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


# ---- changes ---------------------------------------------------------------------------------------

async def load_tree(conn: AsyncConnection, key: str) -> StepTree | None:
    return tree_from_rows((await conn.execute(TREE_SQL, {"key": key})).all(), key)


async def parent_names(conn: AsyncConnection, step_id: str) -> list[str]:
    rows = await conn.execute(
        select(steps.c.name).distinct().join(step_children, step_children.c.parent_id == steps.c.id)
        .where(step_children.c.child_id == step_id).order_by(steps.c.name))
    return [r.name for r in rows]


@dataclass(frozen=True)
class StepsApplied:
    """What a change of step trees did: whether its first step was created, that step's resolved tree, and
    what became of each step it defined ("created", "changed" or "unchanged"), in the order defined."""

    created: bool
    tree: StepTree
    outcomes: dict[str, str]


async def _unchanged(conn: AsyncConnection, ids: Sequence[str], defined: dict[str, StepDef],
                     names_of: dict[str, str]) -> set[str]:
    """The names of the stored steps (by id) whose definition is the same as the one given: same kind, same
    fields, same children with the same mappers in the same order."""
    same: set[str] = set()
    for i in range(0, len(ids), CHUNK):
        chunk = ids[i:i + CHUNK]
        stored = {r.id: r for r in await conn.execute(
            select(steps.c.id, steps.c.name, steps.c.kind, steps.c.config).where(steps.c.id.in_(chunk)))}
        links: dict[str, list[tuple[str, str | None]]] = {step_id: [] for step_id in chunk}
        for r in await conn.execute(select(step_children.c.parent_id, step_children.c.child_id,
                                           step_children.c.mapper)
                                    .where(step_children.c.parent_id.in_(chunk))
                                    .order_by(step_children.c.parent_id, step_children.c.position)):
            links[r.parent_id].append((names_of.get(r.child_id, r.child_id), r.mapper))
        for step_id, row in stored.items():
            d = defined[row.name]
            # Through JSON both: the stored config was parsed from JSON, the new one may hold tuples.
            fields = orjson.loads(orjson.dumps(d.config.fields_json()))
            if (row.kind == d.config.kind and row.config == fields
                    and links[step_id] == [(link.step, link.mapper) for link in d.links]):
                same.add(row.name)
    return same


async def put_steps(conn: AsyncConnection, defs: Sequence[StepDef], if_match: int | None,
                    now: datetime, max_nodes: int) -> StepsApplied:
    root = defs[0].config.name
    defined = {d.config.name: d for d in defs}
    referenced = {link.step for d in defs for link in d.links} - set(defined)
    names = sorted(set(defined) | referenced)
    existing: dict[str, tuple[str, int]] = {}
    for i in range(0, len(names), CHUNK):
        rows = await conn.execute(select(steps.c.name, steps.c.id, steps.c.version)
                                  .where(steps.c.name.in_(names[i:i + CHUNK])))
        existing.update({r.name: (r.id, r.version) for r in rows})
    missing = sorted(referenced - set(existing))
    if missing:
        raise StepsRefused(422, "children refer to steps that do not exist: " + ", ".join(missing)
                           + "; create them first or define them inline")
    current = existing.get(root, (None, None))[1]
    if if_match is not None and current is None:
        # RFC 9110 13.1.1: no current representation, so no version can match; PUT creates only unconditionally.
        raise StepsRefused(412, f"step '{root}' does not exist, so it has no version {if_match}: to create it, "
                                "send the request without If-Match")
    if if_match is not None and current != if_match:
        raise StepsRefused(412, f"step '{root}' is at version {current}, not {if_match}: "
                                "reload it and apply your change again")
    graph = await _stored_graph(conn, [existing[n][0] for n in referenced])
    for name, d in defined.items():
        graph[name] = [link.step for link in d.links]
    cycle = find_cycle(graph, root)
    if cycle:
        raise CycleError(cycle)
    ids = {n: v[0] for n, v in existing.items()}
    # Applying a definition again changes nothing, its version included: a file applied twice is not news.
    unchanged = await _unchanged(conn, [ids[n] for n in defined if n in existing], defined,
                                 {step_id: name for name, step_id in ids.items()})
    outcomes = {name: "unchanged" if name in unchanged else "changed" if name in existing else "created"
                for name in defined}
    for name, d in defined.items():
        values = {"kind": d.config.kind, "config": d.config.fields_json(), "updated_at": now}
        if name in unchanged:
            continue
        if name in existing:
            await conn.execute(update(steps).where(steps.c.id == ids[name])
                               .values(**values, version=steps.c.version + 1))
            await conn.execute(delete(step_children).where(step_children.c.parent_id == ids[name]))
        else:
            ids[name] = str(uuid.uuid4())
            await conn.execute(insert(steps).values(id=ids[name], name=name, version=1, created_at=now, **values))
    links = [{"parent_id": ids[name], "position": pos, "child_id": ids[link.step], "mapper": link.mapper}
             for name, d in defined.items() if name not in unchanged for pos, link in enumerate(d.links)]
    for i in range(0, len(links), CHUNK):
        await conn.execute(insert(step_children), links[i:i + CHUNK])
    deepest = (await conn.execute(_DEPTH_SQL, {"now": now, "limit": MAX_TREE_DEPTH})).scalar()
    if deepest is not None and deepest > MAX_TREE_DEPTH:
        # Raised inside the transaction: nothing of this change is kept.
        raise StepsRefused(422, f"step trees may nest at most {MAX_TREE_DEPTH} levels, and with this change a "
                                f"tree containing '{root}' would nest more; flatten it or split it")
    await _check_sizes(conn, now, max_nodes)
    tree = await load_tree(conn, ids[root])
    assert tree is not None
    return StepsApplied(root not in existing, tree, outcomes)


# How deep the deepest stored tree containing a step changed at `now` is (the steps just written carry
# updated_at = now: seeding from that column avoids a bound parameter per step). Counting stops past `limit`.
_DEPTH_SQL = text(
    "WITH RECURSIVE up(id) AS ("
    " SELECT id FROM steps WHERE updated_at = :now"
    " UNION SELECT sc.parent_id FROM step_children sc JOIN up ON sc.child_id = up.id),"
    " tops(id) AS (SELECT id FROM up WHERE id NOT IN (SELECT child_id FROM step_children)),"
    " down(id, d) AS (SELECT id, 1 FROM tops"
    " UNION SELECT sc.child_id, down.d + 1 FROM step_children sc JOIN down ON sc.parent_id = down.id"
    " WHERE down.d <= :limit)"
    " SELECT max(d) FROM down"
).bindparams(bindparam("now", type_=UTCDateTime()))


# What counting the nodes of every stored tree containing a step changed at `now` needs (seeded as _DEPTH_SQL
# is), by the first column: 0, each such tree; 1, each step below them with children, and its number of links;
# 2, the links from such a step to another step with children, grouped, with their number. Links to steps
# without children are never read one by one (a parallel parent of 100,000 api steps is one count), and
# nothing is looked up per link: a subquery per link made PostgreSQL scan the whole table once per link.
_SIZES_SQL = text(
    "WITH RECURSIVE up(id) AS ("
    " SELECT id FROM steps WHERE updated_at = :now"
    " UNION SELECT sc.parent_id FROM step_children sc JOIN up ON sc.child_id = up.id),"
    " down(id) AS (SELECT id FROM up"
    " UNION SELECT sc.child_id FROM step_children sc JOIN down ON sc.parent_id = down.id),"
    " parents(id) AS (SELECT id FROM down WHERE EXISTS (SELECT 1 FROM step_children k WHERE k.parent_id = down.id))"
    " SELECT 0, id, NULL, 0 FROM up"
    " UNION ALL SELECT 1, sc.parent_id, NULL, count(*) FROM step_children sc JOIN parents p ON sc.parent_id = p.id"
    " GROUP BY sc.parent_id"
    " UNION ALL SELECT 2, sc.parent_id, sc.child_id, count(*) FROM step_children sc JOIN parents p"
    " ON sc.parent_id = p.id WHERE sc.child_id IN (SELECT id FROM parents) GROUP BY sc.parent_id, sc.child_id"
).bindparams(bindparam("now", type_=UTCDateTime()))


async def _check_sizes(conn: AsyncConnection, now: datetime, max_nodes: int) -> None:
    """TreeTooBig when a stored tree containing a step changed at `now` resolves to more than `max_nodes` nodes.

    Counted from the links, once per step (never by building the tree), inside the change's transaction.
    """
    trees: list[str] = []
    counts: dict[str, int] = {}
    links: dict[str, list[tuple[str | None, int]]] = {}
    for what, step, child, n in await conn.execute(_SIZES_SQL, {"now": now}):
        if what == 0:
            trees.append(step)
        elif what == 1:
            counts[step] = n
        else:
            links.setdefault(step, []).append((child, n))
    for step, n in counts.items():
        kids = links.setdefault(step, [])
        if leaves := n - sum(k for _, k in kids):
            kids.append((None, leaves))
    found = first_oversized(links, trees, max_nodes)
    if found is not None:
        step_id, count = found
        name = await conn.scalar(select(steps.c.name).where(steps.c.id == step_id))
        raise TreeTooBig(str(name), count, max_nodes, changed=True)  # inside the transaction: nothing is kept


async def _stored_graph(conn: AsyncConnection, start_ids: list[str]) -> dict[str, list[str]]:
    """Name → child names for every stored step reachable from `start_ids`."""
    if not start_ids:
        return {}
    params = {f"s{i}": sid for i, sid in enumerate(start_ids)}
    anchors = ", ".join(f":s{i}" for i in range(len(start_ids)))
    rows = await conn.execute(text(
        f"WITH RECURSIVE reach(id) AS (SELECT id FROM steps WHERE id IN ({anchors})"
        " UNION SELECT sc.child_id FROM step_children sc JOIN reach r ON sc.parent_id = r.id)"
        " SELECT p.name AS parent, c.name AS child, sc.position FROM reach"
        " JOIN step_children sc ON sc.parent_id = reach.id"
        " JOIN steps p ON p.id = sc.parent_id JOIN steps c ON c.id = sc.child_id"
        " ORDER BY p.name, sc.position"), params)
    graph: dict[str, list[str]] = {}
    for r in rows:
        graph.setdefault(r.parent, []).append(r.child)
    return graph
