"""`aetr serve` under more sockets than it may open files: it keeps answering."""

from __future__ import annotations

import asyncio
import time

import aiohttp

from aetr.api.server import FILES_RESERVED
from tests.e2e.harness import Launcher

OPEN_FILES = 256  # the server's `ulimit -n`, soft and hard (1,024 is a common default)
SOCKETS = 400  # idle sockets the test opens: more than the server may open files


async def test_idle_sockets_beyond_the_open_file_limit_do_not_stop_healthz(launcher: Launcher,
                                                                           database_url: str) -> None:
    # A header timeout longer than the test: only the connection cap can make room here.
    env = {"AETR_MAX_IN_FLIGHT": "16", "AETR_DB_POOL_SIZE": "4", "AETR_HEADER_TIMEOUT_S": "600"}
    server = await launcher.serve(database_url, env=env, open_files=OPEN_FILES)
    cap = OPEN_FILES - 4 - 16 - FILES_RESERVED  # the rest is kept for the pool, the step calls and other files
    assert f"AETR_MAX_CONNECTIONS=1000 lowered to {cap}" in server.log()
    host, port = "127.0.0.1", server.port
    sockets = [await asyncio.open_connection(host, port) for _ in range(SOCKETS)]
    try:
        started = time.monotonic()
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http, \
                http.get(f"{server.url}/healthz") as response:
            assert response.status == 200, await response.text()
        assert time.monotonic() - started < 5
        # The sockets beyond the cap were closed by the server, oldest first.
        oldest_reader, _ = sockets[0]
        async with asyncio.timeout(10):
            assert await oldest_reader.read() == b""
        # It never ran out of descriptors: out of them, libuv takes waiting connections and drops them.
        assert "Too many open files" not in server.log()
    finally:
        for _, writer in sockets:
            writer.close()
