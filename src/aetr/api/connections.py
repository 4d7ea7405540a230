"""HTTP connections: uvicorn's protocols with time limits on reading a request and a cap on open connections.

uvicorn bounds only the idle time between two requests (its keep-alive timeout). A socket that sends nothing,
sends its headers a byte at a time, or trickles its body was held for as long as the client liked, and enough
of them used up the process's file descriptors. Here every connection has one timer that checks a deadline:
complete headers within the header timeout (counted from the connection's opening, or from the first byte of
the next request on a kept-alive connection), the whole body within the body timeout (counted from the
headers). The time a route takes to answer is not limited (`?wait=` holds a request open on purpose).

At the connection cap, a new connection closes the oldest one that has no request in progress, preferring
one that never sent a whole request; when every connection is busy, the new one is closed at once.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any, cast

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("aetr.api")

WARN_EVERY_S = 60.0  # seconds between two warnings that the connection cap was reached
_warned_at = float("-inf")


@dataclass(frozen=True)
class ConnectionLimits:
    """How long a request may take to arrive, and how many connections one process keeps open."""

    header_timeout_s: float = 10.0
    body_timeout_s: float = 60.0
    max_connections: int = 1000


class ServerConfig(uvicorn.Config):
    """uvicorn's configuration plus the limits AETR's HTTP protocols enforce (picklable, for `--workers N`)."""

    def __init__(self, app: Any, *, limits: ConnectionLimits, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self.limits = limits


# What a connection waits for from its client; plain strings, not an Enum: they are set on every request.
HEADERS = "headers"
BODY = "body"


class Watch:
    """One connection's deadline and the timer that enforces it."""

    __slots__ = ("body_s", "deadline", "header_s", "interval", "limits", "loop", "opened_at", "phase", "served",
                 "timer", "transport")

    def __init__(self, loop: asyncio.AbstractEventLoop, limits: ConnectionLimits) -> None:
        self.loop = loop
        self.limits = limits
        self.header_s = limits.header_timeout_s
        self.body_s = limits.body_timeout_s
        # The timer fires at least this often, so a deadline set later is never missed (none is shorter).
        self.interval = min(self.header_s, self.body_s)
        self.transport: asyncio.BaseTransport | None = None
        self.phase: str | None = None
        self.deadline: float | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.opened_at = 0.0
        self.served = False  # whether a whole request's headers ever arrived

    def opened(self, transport: asyncio.BaseTransport) -> None:
        """The connection is open: its first request's headers are due."""
        self.transport = transport
        self.opened_at = self.loop.time()
        self.headers_due()
        self._arm(self.opened_at)

    def headers_due(self) -> None:
        """A request has begun (or the connection opened): its headers are due within the header timeout."""
        if self.phase is not HEADERS:
            self.phase = HEADERS
            self.deadline = self.loop.time() + self.header_s

    def body_due(self) -> None:
        """A request's headers have arrived: its body is due within the body timeout."""
        if self.phase is not BODY:
            self.phase = BODY
            self.served = True
            self.deadline = self.loop.time() + self.body_s

    def received(self) -> None:
        """A request has arrived whole: nothing is due until the next one begins."""
        self.phase = self.deadline = None

    def closed(self) -> None:
        """The connection is gone: stop its timer."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _check(self) -> None:
        now = self.loop.time()
        if self.deadline is not None and now >= self.deadline:
            self.timer = None
            log.debug("closing a connection that did not send its request's %s in time", self.phase)
            if self.transport is not None:
                self.transport.close()
            return
        self._arm(now)

    def _arm(self, now: float) -> None:
        # Never later than one interval from now: a deadline set meanwhile is at least that far away.
        due = now + self.interval if self.deadline is None else min(self.deadline, now + self.interval)
        self.timer = self.loop.call_at(due, self._check)


def _make_room(newcomer: Any, connections: set[Any], limits: ConnectionLimits) -> None:
    """Over the cap: close the oldest connection with no request in progress (never-served ones first),
    or the newcomer when every other connection is busy.

    One closed stays in `connections` until its transport has let go of it, a turn or more later: it is not
    counted, nor chosen again, meanwhile (when several connections opened at one turn, each chose the same one
    and the process went on past the cap to its open-file limit)."""
    open_ = [c for c in connections if not c.transport.is_closing()]
    if len(open_) <= limits.max_connections:
        return
    idle = [c for c in open_ if c is not newcomer and isinstance(getattr(c, "watch", None), Watch)
            and (c.cycle is None or c.cycle.response_complete)]
    victim = min(idle, key=lambda c: (c.watch.served, c.watch.opened_at)) if idle else newcomer
    victim.transport.close()
    global _warned_at
    now = newcomer.watch.loop.time()
    if now - _warned_at >= WARN_EVERY_S:  # a flood of connections must not become a flood of log lines
        _warned_at = now
        log.warning("%d connections are open, the most AETR_MAX_CONNECTIONS=%d allows: closing %s (said at most "
                    "once a minute)", len(open_), limits.max_connections,
                    "the oldest idle one" if idle else "new ones, every other one is busy")


def limits_of(config: uvicorn.Config) -> ConnectionLimits:
    """The limits a uvicorn configuration carries (the defaults for a plain one)."""
    return config.limits if isinstance(config, ServerConfig) else ConnectionLimits()


class _Watched:
    """What both protocols add to uvicorn's: a watch on each connection, and the cap applied as one opens.

    Listed before the uvicorn protocol class it extends, whose methods `super()` reaches.
    """

    loop: asyncio.AbstractEventLoop
    connections: set[Any]

    def __init__(self, config: uvicorn.Config, *args: Any, **kwargs: Any) -> None:
        super().__init__(config, *args, **kwargs)  # type: ignore[call-arg]  # the uvicorn protocol's
        self.watch = Watch(self.loop, limits_of(config))

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)  # type: ignore[misc]  # the uvicorn protocol's
        self.watch.opened(cast(asyncio.Transport, transport))  # a TCP connection's, which uvicorn serves
        if len(self.connections) > self.watch.limits.max_connections:
            _make_room(self, self.connections, self.watch.limits)

    def connection_lost(self, exc: Exception | None) -> None:
        self.watch.closed()
        super().connection_lost(exc)  # type: ignore[misc]  # the uvicorn protocol's


class H11Limited(_Watched, H11Protocol):
    """uvicorn's h11 protocol with AETR's time limits and connection cap."""

    def data_received(self, data: bytes) -> None:
        if self.conn.their_state is h11.IDLE:
            self.watch.headers_due()  # the first bytes of a request (or of more partial headers)
        super().data_received(data)

    def handle_events(self) -> None:
        super().handle_events()
        state = self.conn.their_state
        if state is h11.SEND_BODY:
            self.watch.body_due()
        elif state is not h11.IDLE:
            self.watch.received()


try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
except ImportError:  # httptools is not installed: uvicorn itself falls back to h11
    HttpToolsLimited: type[asyncio.Protocol] | None = None
else:

    class _HttpToolsLimited(_Watched, HttpToolsProtocol):
        """uvicorn's httptools protocol with AETR's time limits and connection cap."""

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self.watch.headers_due()

        def on_headers_complete(self) -> None:
            self.watch.body_due()
            super().on_headers_complete()

        def on_message_complete(self) -> None:
            self.watch.received()
            super().on_message_complete()

    HttpToolsLimited = _HttpToolsLimited

PROTOCOLS: dict[str, type[asyncio.Protocol]] = {"h11": H11Limited}
if HttpToolsLimited is not None:
    PROTOCOLS["httptools"] = HttpToolsLimited
DEFAULT_PROTOCOL = "httptools" if "httptools" in PROTOCOLS else "h11"  # as uvicorn's "auto" chooses
