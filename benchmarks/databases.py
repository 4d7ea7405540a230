"""Fresh databases, one per scenario: a new SQLite file, or a PostgreSQL database created and dropped."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Final
from urllib.parse import urlsplit, urlunsplit

import asyncpg

DEFAULT_POSTGRES_URL: Final = "postgresql://postgres@127.0.0.1:5432/postgres"
CONNECT_TIMEOUT_S: Final = 10.0  # seconds to reach the PostgreSQL server


def _with_database(url: str, name: str) -> str:
    """`url` pointing at database `name` instead."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, f"/{name}", parts.query, parts.fragment))


@asynccontextmanager
async def fresh_database(db: str, workdir: Path, label: str, postgres_url: str) -> AsyncIterator[str]:
    """Yield the URL of a new, empty database of kind `db` ("sqlite" or "postgres"); drop it afterwards."""
    if db == "sqlite":
        path = workdir / f"{label}-{secrets.token_hex(4)}.db"
        try:
            yield f"sqlite:///{path}"
        finally:
            _remove_sqlite(path)
        return
    name = f"aetr_bench_{label.replace('-', '_')}_{secrets.token_hex(4)}"
    admin = await asyncpg.connect(postgres_url, timeout=CONNECT_TIMEOUT_S)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        try:
            yield _with_database(postgres_url, name)
        finally:
            # FORCE: a server we had to kill may still hold a connection.
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


def _remove_sqlite(path: Path) -> None:
    """Delete a SQLite database and its WAL files."""
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)


async def check_postgres(postgres_url: str) -> str | None:
    """None when the PostgreSQL server answers; else why not."""
    try:
        conn = await asyncpg.connect(postgres_url, timeout=CONNECT_TIMEOUT_S)
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        return f"{type(exc).__name__}: {exc}"
    await conn.close()
    return None
