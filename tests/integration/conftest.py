"""Integration fixtures: every store test runs on real SQLite and real PostgreSQL."""

from __future__ import annotations

import asyncio
import os
import socket
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import orjson
import pytest
import uvicorn
from sqlalchemy import text

from aetr.api.app import create_app
from aetr.api.connections import DEFAULT_PROTOCOL
from aetr.api.server import server_config
from aetr.config import Settings
from aetr.engine.runtime import Engine
from aetr.store import Store, open_store
from aetr.store.migrate import upgrade_engine
from aetr.testing import StepService

PG_ADMIN_URL = os.environ.get("AETR_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
REQUIRE_PG = os.environ.get("AETR_REQUIRE_POSTGRES") == "1"
TABLES = "events, work, run_counters, run_nodes, step_children, steps, settings, schedules, schedule_runs"


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database for this test session, dropped at the end."""
    name = f"aetr_test_{uuid.uuid4().hex[:10]}"

    async def admin(sql: str) -> None:
        conn = await asyncpg.connect(PG_ADMIN_URL, timeout=5)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    try:
        asyncio.run(admin(f'CREATE DATABASE "{name}"'))
    except (OSError, asyncpg.PostgresError) as exc:
        if REQUIRE_PG:
            pytest.fail(f"PostgreSQL is required (AETR_REQUIRE_POSTGRES=1) but not reachable at {PG_ADMIN_URL}: {exc}")
        pytest.skip(f"PostgreSQL not reachable at {PG_ADMIN_URL}: {exc}")
    base = PG_ADMIN_URL.rsplit("/", 1)[0]
    yield f"{base}/{name}"
    asyncio.run(admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A database URL for an empty, migrated-on-open database of each backend."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'aetr.db'}"
    url: str = request.getfixturevalue("pg_url")
    return url


@pytest.fixture
async def store(database_url: str) -> AsyncIterator[Store]:
    """A migrated, empty Store on each backend."""
    s = open_store(database_url)
    await upgrade_engine(s.engine)
    if s.dialect == "postgresql":
        async with s.engine.begin() as conn:
            await conn.exec_driver_sql(f"TRUNCATE {TABLES} RESTART IDENTITY CASCADE")
    try:
        yield s
    finally:
        await s.close()


class Server:
    """A real AETR server on a loopback port, with an HTTP client pointed at it."""

    def __init__(self, engine: Any, base_url: str, session: aiohttp.ClientSession,
                 uvicorn_server: uvicorn.Server | None = None) -> None:
        self.engine = engine
        self.base_url = base_url
        self.http = session
        self.uvicorn = uvicorn_server

    async def call(self, method: str, path: str, body: Any = None, **kw: Any) -> tuple[int, Any]:
        """(status, parsed JSON or None) of one API request."""
        if body is not None:
            kw["data"] = orjson.dumps(body)
            kw.setdefault("headers", {})["Content-Type"] = "application/json"
        async with self.http.request(method, self.base_url + path, **kw) as resp:
            raw = await resp.read()
            return resp.status, (orjson.loads(raw) if raw and "json" in resp.content_type else raw or None)

    async def events(self, run_id: str) -> list[dict[str, Any]]:
        """A run's history, oldest first."""
        status, events = await self.call("GET", f"/api/v1/runs/{run_id}/events")
        assert status == 200, events
        result: list[dict[str, Any]] = events
        return result

    async def put_step(self, spec: dict[str, Any]) -> dict[str, Any]:
        status, body = await self.call("PUT", f"/api/v1/steps/{spec['name']}", spec)
        assert status in (200, 201), body
        result: dict[str, Any] = body
        return result

    async def start(self, step: str, run_input: Any = None) -> str:
        status, body = await self.call("POST", "/api/v1/runs", {"step": step, "input": run_input})
        assert status == 201, body
        return str(body["id"])

    async def wait_run(self, run_id: str, timeout: float = 15.0) -> dict[str, Any]:  # noqa: ASYNC109
        """The run once it has ended; fails the test if it has not within `timeout` seconds."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            left = deadline - asyncio.get_running_loop().time()
            assert left > 0, f"run {run_id} did not end within {timeout} s"
            status, body = await self.call("GET", f"/api/v1/runs/{run_id}?wait={min(left, 10):.1f}")
            assert status == 200, body
            if body["state"] in ("complete", "error", "cancelled"):
                result: dict[str, Any] = body
                return result


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@asynccontextmanager
async def running_server(database_url: str, protocol: str = DEFAULT_PROTOCOL, **settings: Any) -> AsyncIterator[Server]:
    """Start AETR on a free loopback port (uvicorn configured as `aetr serve` does, in this event loop) and stop
    it afterwards."""
    port = free_port()
    # From an empty environment: the developer's own AETR_* variables must not change what a test runs.
    config = Settings.from_env({}, **{"database_url": database_url, "port": port, "poll_s": 0.2, "lease_s": 5.0,
                                      **settings})
    engine = Engine(config)
    if engine.store.dialect == "postgresql":
        await upgrade_engine(engine.store.engine)
        async with engine.store.engine.begin() as conn:
            await conn.exec_driver_sql(f"TRUNCATE {TABLES} RESTART IDENTITY CASCADE")
    server = uvicorn.Server(server_config(config, create_app(engine=engine), protocol=protocol,
                                          log_level="warning", lifespan="on"))
    task = asyncio.create_task(server.serve())
    deadline = asyncio.get_running_loop().time() + 15
    while not server.started:
        assert not task.done(), "the server stopped while starting"
        assert asyncio.get_running_loop().time() < deadline, "the server did not start within 15 s"
        await asyncio.sleep(0.01)  # uvicorn offers no start event; poll its flag with a deadline
    try:
        async with aiohttp.ClientSession() as session:
            yield Server(engine, f"http://127.0.0.1:{port}", session, server)
    finally:
        server.should_exit = True
        await task


@pytest.fixture
async def aetr(database_url: str) -> AsyncIterator[Server]:
    """A running AETR server on each backend."""
    async with running_server(database_url) as server:
        yield server


@pytest.fixture
async def steps_service() -> AsyncIterator[StepService]:
    """A controllable step service on a loopback port."""
    async with StepService() as svc:
        yield svc


async def wait_no_work(aetr: Server, timeout: float = 10.0) -> int:  # noqa: ASYNC109
    """The number of work rows once none remain, or after `timeout` seconds (a call's 202 is recorded late)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        async with aetr.engine.store.engine.connect() as conn:
            left = int((await conn.execute(text("SELECT count(*) FROM work"))).scalar_one())
        if left == 0 or asyncio.get_running_loop().time() > deadline:
            return left
        await asyncio.sleep(0.05)
