"""Accepting connections: every connection waiting on the listening socket is taken at each turn of the loop.

libuv (under uvloop) takes one waiting connection per turn of the event loop. When a hundred clients connect
at once while the loop is busy (a burst of run starts), the last of them waits a hundred turns before its
first request is read: a step service's callback on a new connection waited 1.8 s so, its request already
sent. `new_event_loop` makes uvloop's loop whose servers also watch each listening socket themselves and take
every waiting connection when it is readable (up to ACCEPT_BATCH), as asyncio's own loop does; libuv's one
per turn goes on beside them. Without uvloop, uvicorn runs asyncio's loop, which already does this.

A connection taken is handed to its protocol a turn or two later, and only then does the connection cap
(`api.connections`) close an idle one to make room. So no more than MAX_UNHANDED connections are taken ahead of
their protocols: taking every waiting one at once ran the process out of file descriptors, and libuv, out of
them, takes and drops waiting connections, a request to `/healthz` among them.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
from collections.abc import Callable
from typing import Any, Final

log = logging.getLogger("aetr.api")

ACCEPT_BATCH: Final = 1024  # connections taken at most per turn of the loop
MAX_UNHANDED: Final = 64  # connections taken and not yet handed to their protocol, at most (within FILES_RESERVED)
ACCEPT_PAUSE_S: Final = 1.0  # seconds accepting pauses when the process is out of file descriptors
OUT_OF_FILES: Final = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


class Acceptor:
    """Takes every connection waiting on a listening socket and hands each to the loop with `factory`."""

    def __init__(self, loop: asyncio.AbstractEventLoop, listening: Any,
                 factory: Callable[[], asyncio.Protocol]) -> None:
        self.loop = loop
        self.factory = factory
        # A socket of our own on the same listening socket: the server's handle keeps its own descriptor.
        self.sock = socket.socket(fileno=os.dup(listening.fileno()))
        self.sock.setblocking(False)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._resume: asyncio.TimerHandle | None = None
        self._watching = False
        self.closed = False
        self._watch()

    def _accept(self) -> None:
        for _ in range(ACCEPT_BATCH):
            if len(self._tasks) >= MAX_UNHANDED:
                self._unwatch()  # watched again once a connection taken has been handed on (`_handed`)
                return
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue  # the client gave up while it waited: take the next
            except OSError as exc:
                if exc.errno not in OUT_OF_FILES:
                    raise
                # Out of descriptors: stop watching for a while (the socket stays readable, and the loop would
                # spin on it); the server's own handle and the connection cap make room meanwhile.
                log.warning("accepting connections paused for %g s: %s", ACCEPT_PAUSE_S, exc)
                self._unwatch()
                self._resume = self.loop.call_later(ACCEPT_PAUSE_S, self._resumed)
                return
            conn.setblocking(False)
            if conn.family in (socket.AF_INET, socket.AF_INET6):
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as the server's handle sets it
            task = self.loop.create_task(self._serve(conn))
            self._tasks.add(task)
            task.add_done_callback(self._handed)

    def _watch(self) -> None:
        if not (self.closed or self._watching or self._resume is not None):
            self._watching = True
            self.loop.add_reader(self.sock.fileno(), self._accept)

    def _unwatch(self) -> None:
        if self._watching:
            self._watching = False
            self.loop.remove_reader(self.sock.fileno())

    def _resumed(self) -> None:
        self._resume = None
        self._watch()

    def _handed(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        self._watch()

    async def _serve(self, conn: socket.socket) -> None:
        try:
            await self.loop.connect_accepted_socket(self.factory, conn)
        except Exception:  # the client went away before its transport was made: nothing to serve
            conn.close()

    def close(self) -> None:
        """Stop accepting (the server is shutting down)."""
        if self.closed:
            return
        self.closed = True
        if self._resume is not None:
            self._resume.cancel()
            self._resume = None
        self._unwatch()
        self.sock.close()


class GreedyServer:
    """A server of the loop's, with an Acceptor on each of its listening sockets; closing it closes them."""

    def __init__(self, server: asyncio.AbstractServer, acceptors: list[Acceptor]) -> None:
        self.server = server
        self.acceptors = acceptors

    @property
    def sockets(self) -> Any:
        return getattr(self.server, "sockets", ())

    def close(self) -> None:
        for acceptor in self.acceptors:
            acceptor.close()
        self.server.close()

    async def wait_closed(self) -> None:
        await self.server.wait_closed()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.server, name)


try:
    import uvloop
except ImportError:  # uvicorn runs asyncio's loop, which takes every waiting connection already
    LOOP = "auto"
else:
    LOOP = "aetr.api.accept:new_event_loop"

    class GreedyLoop(uvloop.Loop):
        """uvloop's loop, whose TCP servers take every waiting connection at each turn (see the module)."""

        async def create_server(self, protocol_factory: Any, *args: Any, **kwargs: Any) -> Any:
            server = await super().create_server(protocol_factory, *args, **kwargs)
            sockets = getattr(server, "sockets", None) or ()  # a TCP server's; a Unix socket's has none to take over
            listening = [s for s in sockets if s.family in (socket.AF_INET, socket.AF_INET6)]
            return GreedyServer(server, [Acceptor(self, s, protocol_factory) for s in listening])

    def new_event_loop() -> asyncio.AbstractEventLoop:
        """A new GreedyLoop: uvicorn's loop factory (`loop="aetr.api.accept:new_event_loop"`)."""
        return GreedyLoop()
