"""PostgreSQL for end-to-end tests: a role of the test's own, and an outage of it on demand."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
from sqlalchemy.engine import make_url

from tests.e2e.conftest import PG_ADMIN_URL

DB_DRAIN_S = 10.0  # seconds for PostgreSQL to end the backends it was told to terminate


async def pg_admin(sql: str, database: str | None = None) -> Any:
    """Run one statement as the PostgreSQL administrator (on `database`, else the admin one); its first value."""
    url = PG_ADMIN_URL if database is None else f"{PG_ADMIN_URL.rsplit('/', 1)[0]}/{database}"
    conn = await asyncpg.connect(url, timeout=5)
    try:
        return await conn.fetchval(sql)
    finally:
        await conn.close()


@asynccontextmanager
async def own_role(database_url: str) -> AsyncIterator[tuple[str, str]]:
    """A login role that is not a superuser, for the server to use the test's database with: (role, its URL).

    PostgreSQL lets a superuser past every connection limit; an outage must reach the server.
    """
    url = make_url(database_url)
    assert url.database is not None
    role, password = f"aetr_e2e_{secrets.token_hex(6)}", secrets.token_hex(16)
    await pg_admin(f"CREATE ROLE \"{role}\" LOGIN PASSWORD '{password}'")
    try:
        await pg_admin(f'GRANT ALL ON SCHEMA public TO "{role}"', url.database)
        yield role, url.set(username=role, password=password).render_as_string(hide_password=False)
    finally:
        # The role owns the tables the server made: they go with the database, then the role can go.
        await pg_admin(f'DROP DATABASE IF EXISTS "{url.database}" WITH (FORCE)')
        await pg_admin(f'DROP ROLE IF EXISTS "{role}"')


async def wait_no_connections(role: str) -> None:
    """Wait until `role` has no backend left (pg_terminate_backend only asks them to end)."""
    deadline = time.monotonic() + DB_DRAIN_S
    query = f"SELECT count(*) FROM pg_stat_activity WHERE usename = '{role}'"
    while (left := await pg_admin(query)) > 0:
        assert time.monotonic() < deadline, f"{left} connection(s) of {role} still open after {DB_DRAIN_S} s"
        await asyncio.sleep(0.05)


@asynccontextmanager
async def database_down(role: str) -> AsyncIterator[None]:
    """An outage for `role`, while the block runs: PostgreSQL drops its connections and refuses new ones (too
    many connections), as while it restarts."""
    try:
        await pg_admin(f'ALTER ROLE "{role}" CONNECTION LIMIT 0')
        await pg_admin(f"SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE usename = '{role}'")
        await wait_no_connections(role)
        yield
    finally:
        await pg_admin(f'ALTER ROLE "{role}" CONNECTION LIMIT -1')
