"""The served loop takes every waiting connection at each turn, not one per turn as libuv does."""

from __future__ import annotations

import asyncio
import socket

import pytest

from aetr.api import accept

pytestmark = pytest.mark.skipif(accept.LOOP == "auto", reason="uvloop is not installed: asyncio's loop is served")

CLIENTS = 100
WAIT_S = 10.0  # seconds the test waits at most for what it expects


class Turns:
    """Counts the turns of the running loop (a callback that schedules itself again at each turn)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.count = 0
        self.handle = loop.call_soon(self.tick)

    def tick(self) -> None:
        self.count += 1
        self.handle = self.loop.call_soon(self.tick)


async def connections_accepted() -> tuple[list[int], bytes, bool]:
    """Open CLIENTS connections at once: the loop turn each was accepted at, an echo on one, and whether the
    closed server still accepts."""
    loop = asyncio.get_running_loop()
    accepted_at: list[int] = []
    all_accepted = asyncio.Event()
    turns = Turns(loop)

    class Echo(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            accepted_at.append(turns.count)
            self.transport = transport
            if len(accepted_at) == CLIENTS:
                all_accepted.set()

        def data_received(self, data: bytes) -> None:
            self.transport.write(data)  # type: ignore[attr-defined]  # a TCP transport's

    server = await loop.create_server(Echo, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(CLIENTS)]  # all wait to be accepted
    try:
        async with asyncio.timeout(WAIT_S):
            await all_accepted.wait()
            clients[-1].setblocking(False)
            await loop.sock_sendall(clients[-1], b"ping")
            echo = await loop.sock_recv(clients[-1], 4)
        server.close()
        late = socket.socket()
        late.setblocking(False)
        try:
            async with asyncio.timeout(WAIT_S):
                await loop.sock_connect(late, ("127.0.0.1", port))
            still_accepting = True
        except ConnectionRefusedError:
            still_accepting = False
        finally:
            late.close()
    finally:
        for client in clients:
            client.close()
        turns.handle.cancel()
    return accepted_at, echo, still_accepting


def test_every_connection_waiting_is_accepted_within_a_turn_or_two_and_served_and_none_after_close() -> None:
    loop = accept.new_event_loop()
    try:
        accepted_at, echo, still_accepting = loop.run_until_complete(connections_accepted())
    finally:
        loop.close()
    # libuv alone accepts one connection per turn: the last would come CLIENTS - 1 turns after the first.
    assert max(accepted_at) - min(accepted_at) <= 2
    assert echo == b"ping"
    assert not still_accepting
