"""What a backend executes: statements compiled once per dialect, and the three ways a program runs them.

SQLAlchemy's per-statement machinery (compiling, caching, type processing, pool events) cost more than the
database itself on the hot path (docs/performance.md): statements are built with SQLAlchemy Core, compiled
here once, and run on the raw driver.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any, Literal

import orjson
from sqlalchemy.dialects.postgresql.asyncpg import dialect as asyncpg_dialect
from sqlalchemy.dialects.sqlite.aiosqlite import dialect as aiosqlite_dialect
from sqlalchemy.sql import ClauseElement

from aetr.domain import decide

DialectName = Literal["sqlite", "postgresql"]


@dataclass(frozen=True)
class Sql:
    """A statement compiled for one dialect: its text and the order of its parameters."""

    text: str
    names: tuple[str, ...]
    defaults: dict[str, Any]
    writes: bool = True  # False for a read, which never opens a transaction
    # Atomic by itself: PostgreSQL runs it without BEGIN and COMMIT when it is the only write of its program.
    alone: bool = False
    as_json: tuple[str, ...] = ()  # parameters sent as JSON text (lists of rows); None stays NULL

    def args(self, values: dict[str, Any]) -> tuple[Any, ...]:
        """Positional arguments for the driver from named values."""
        if self.defaults:
            values = {**self.defaults, **values}
        if self.as_json:
            values = {**values, **{k: _json_text(values[k]) for k in self.as_json}}
        return self._pick(values)

    @functools.cached_property
    def _pick(self) -> Callable[[dict[str, Any]], tuple[Any, ...]]:
        # One C call per row (itemgetter answers a tuple for two names or more), not a generator of lookups.
        if len(self.names) >= 2:
            return operator.itemgetter(*self.names)
        if self.names:
            (name,) = self.names
            return lambda values: (values[name],)
        return lambda values: ()


def _json_text(rows: Any) -> str | None:
    """Rows as JSON text for a `json` parameter (a time without a zone taken as UTC); None stays NULL."""
    return None if rows is None else orjson.dumps(rows, option=orjson.OPT_NAIVE_UTC).decode()


def compile_sql(stmt: ClauseElement, dialect: DialectName) -> Sql:
    """Compile a Core statement once for `dialect` (qmark for sqlite3, $n for asyncpg)."""
    compiled = stmt.compile(dialect=aiosqlite_dialect() if dialect == "sqlite" else asyncpg_dialect())  # type: ignore[no-untyped-call]
    names = tuple(getattr(compiled, "positiontup", None) or ())
    defaults = {k: v for k, v in compiled.params.items() if v is not None}
    return Sql(str(compiled), names, defaults)


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


OpStream = Generator[Op | decide.RunScript, Any, Any]  # a lowered program (aetr.store.lowering)
