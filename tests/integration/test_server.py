"""HTTP connections as `aetr serve` configures uvicorn: time limits on reading a request, the connection cap and
keep-alive, seen from raw sockets on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson
import pytest

from aetr.api.connections import PROTOCOLS
from tests.integration.conftest import Server, running_server

SLACK_S = 2.0  # seconds a limit may be late by on a busy 2-core machine


class Raw:
    """One raw HTTP/1.1 connection to the server."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def request(self, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
        """(status, body) of one request on this connection."""
        head = f"{method} {path} HTTP/1.1\r\nHost: aetr\r\nContent-Length: {len(body)}\r\n"
        if body:
            head += "Content-Type: application/json\r\n"
        await self.send(head.encode() + b"\r\n" + body)
        async with asyncio.timeout(10):
            status_line, *header_lines = (await self.reader.readuntil(b"\r\n\r\n")).decode().split("\r\n")
            headers = dict(line.lower().split(": ", 1) for line in header_lines if line)
            answer = await self.reader.readexactly(int(headers["content-length"]))
        return int(status_line.split()[1]), answer

    async def closed_within(self, seconds: float) -> float:
        """Seconds until the server closes the connection; fails the test if it is still open after `seconds`."""
        started = time.monotonic()
        try:
            async with asyncio.timeout(seconds):
                while await self.reader.read(65536):
                    pass
        except TimeoutError:
            raise AssertionError(f"the connection is still open after {seconds} s") from None
        except ConnectionResetError:
            pass
        return time.monotonic() - started



Opener = Callable[[Server], Awaitable[Raw]]


@pytest.fixture
async def connect() -> AsyncIterator[Opener]:
    """Opens raw connections to a server; closes them all after the test, whatever happened."""
    opened: list[Raw] = []

    async def open_one(aetr: Server) -> Raw:
        host, port = aetr.base_url.removeprefix("http://").split(":")
        opened.append(Raw(*await asyncio.open_connection(host, int(port))))
        return opened[-1]

    yield open_one
    for raw in opened:
        raw.writer.close()
        with contextlib.suppress(OSError):
            await raw.writer.wait_closed()


@pytest.mark.parametrize("protocol", sorted(PROTOCOLS))
async def test_a_connection_that_does_not_finish_its_headers_is_closed_within_the_header_timeout(
        database_url: str, protocol: str, connect: Opener) -> None:
    async with running_server(database_url, protocol=protocol, header_timeout_s=1.0) as aetr:
        silent, slow = await connect(aetr), await connect(aetr)
        await slow.send(b"GET /healthz HTTP/1.1\r\nHost: aetr\r\n")

        async def trickle() -> None:  # a header line now and then keeps the socket busy, never complete
            for i in range(100):
                await asyncio.sleep(0.2)
                await slow.send(f"X-Slow-{i}: 1\r\n".encode())

        trickling = asyncio.create_task(trickle())
        try:
            assert await slow.closed_within(1.0 + SLACK_S) >= 0.5
            assert await silent.closed_within(1.0 + SLACK_S) >= 0
        finally:
            trickling.cancel()
            await asyncio.gather(trickling, return_exceptions=True)
        # A request that arrives whole is served as always.
        client = await connect(aetr)
        assert (await client.request("GET", "/healthz"))[0] == 200


@pytest.mark.parametrize("protocol", sorted(PROTOCOLS))
async def test_a_trickled_body_is_cut_off_at_the_body_timeout_and_starts_nothing(
        database_url: str, protocol: str, connect: Opener) -> None:
    async with running_server(database_url, protocol=protocol, body_timeout_s=1.0) as aetr:
        await aetr.put_step({"name": "e", "kind": "sequential"})
        body = orjson.dumps({"step": "e", "input": "x" * 200})
        slow = await connect(aetr)
        await slow.send(b"POST /api/v1/runs HTTP/1.1\r\nHost: aetr\r\nContent-Type: application/json\r\n"
                        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n")

        async def trickle() -> None:
            for byte in body[:-1]:  # all but the last byte, one every 50 ms: ~10 s in all
                await asyncio.sleep(0.05)
                await slow.send(bytes([byte]))

        trickling = asyncio.create_task(trickle())
        try:
            assert await slow.closed_within(1.0 + SLACK_S) >= 0.5
        finally:
            trickling.cancel()
            await asyncio.gather(trickling, return_exceptions=True)
        _, page = await aetr.call("GET", "/api/v1/runs")
        assert page["runs"] == []
        # The same body sent at once starts the run.
        client = await connect(aetr)
        assert (await client.request("POST", "/api/v1/runs", body))[0] == 201


async def until(condition: Callable[[], bool], what: str, timeout: float = 10.0) -> None:  # noqa: ASYNC109
    """Wait until `condition()` holds (the server acts on sockets on its own turns of the loop)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        await asyncio.sleep(0.01)


async def fill_to_cap(aetr: Server, connect: Opener, cap: int) -> tuple[set[Any], list[Raw]]:
    """Open `cap` idle connections to a server whose cap is `cap`: the server's set of connections, and them."""
    assert aetr.uvicorn is not None
    connections: set[Any] = aetr.uvicorn.server_state.connections
    # The engine connects to its own port once as it starts (to know it listens): let that be over.
    await until(lambda: aetr.engine.coordinator.sink is not None and not connections, "the engine's probe")
    idle = [await connect(aetr) for _ in range(cap)]
    await until(lambda: len(connections) == cap, f"the server holds {cap} connections")
    return connections, idle


async def test_at_the_connection_cap_the_oldest_idle_socket_makes_room_and_healthz_answers(
        database_url: str, connect: Opener) -> None:
    cap = 8
    async with running_server(database_url, max_connections=cap) as aetr:
        connections, idle = await fill_to_cap(aetr, connect, cap)
        client = await connect(aetr)
        try:
            assert (await client.request("GET", "/healthz"))[0] == 200
            assert await idle[0].closed_within(SLACK_S) >= 0  # the oldest socket that never sent a request
            await until(lambda: len(connections) == cap, f"the server holds {cap} connections again")
            # Every connection busy: each has sent a request's headers and holds back its body.
            for raw in [client, *idle[1:]]:
                await raw.send(b"POST /api/v1/runs HTTP/1.1\r\nHost: aetr\r\nContent-Length: 2\r\n"
                               b"Content-Type: application/json\r\n\r\n")
            await until(lambda: all(getattr(c, "cycle", None) is not None and not c.cycle.response_complete
                                    for c in connections), "every connection has a request in progress")
            newcomer = await connect(aetr)
            assert await newcomer.closed_within(SLACK_S) >= 0  # refused at once, not left hanging
            # The busy connections were kept: one finishes its request.
            await client.send(b"{}")
            async with asyncio.timeout(10):
                assert (await client.reader.readuntil(b"\r\n")).startswith(b"HTTP/1.1 422")
        finally:
            for raw in [client, *idle]:  # before the server stops: it waits for requests in progress
                raw.writer.close()


async def test_a_burst_of_connections_at_the_cap_closes_as_many_old_ones_and_holds_no_more_than_the_cap(
        database_url: str, connect: Opener) -> None:
    cap, burst = 8, 24
    async with running_server(database_url, max_connections=cap) as aetr:
        connections, idle = await fill_to_cap(aetr, connect, cap)
        # Opened together, several are made at one turn of the loop, each over the cap.
        await asyncio.gather(*(connect(aetr) for _ in range(burst)))
        await until(lambda: len(connections) == cap, f"the server holds {cap} connections after the burst")
        for raw in idle:  # the oldest were closed to make room
            assert await raw.closed_within(SLACK_S) >= 0
        assert (await (await connect(aetr)).request("GET", "/healthz"))[0] == 200


async def test_a_connection_idle_for_10_s_serves_the_next_request(database_url: str, connect: Opener) -> None:
    async with running_server(database_url) as aetr:
        await aetr.put_step({"name": "e", "kind": "sequential"})
        client = await connect(aetr)
        assert (await client.request("GET", "/healthz"))[0] == 200
        # Idle for longer than uvicorn's default keep-alive (5 s) and as long as the header timeout (10 s):
        # the idle time is what is tested here.
        await asyncio.sleep(10)
        status, answer = await client.request("POST", "/api/v1/runs", orjson.dumps({"step": "e"}))
        assert status == 201, answer  # on the same socket: the server did not close it
