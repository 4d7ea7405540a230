"""PostgreSQL: several processes share it; row locks and SKIP LOCKED do the coordination."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy.dialects.postgresql import insert as pg_insert

from aetr.store.store import Store


class PostgresStore(Store):
    """Store on PostgreSQL through asyncpg."""

    dialect = "postgresql"

    def _claim_query(self, now: datetime, limit: int) -> Any:
        # Two processes claiming at once skip each other's rows instead of waiting or double-claiming.
        return super()._claim_query(now, limit).with_for_update(skip_locked=True)

    def _insert_ignore(self, table: Any, values: dict[str, Any]) -> Any:
        return pg_insert(table).values(**values).on_conflict_do_nothing()
