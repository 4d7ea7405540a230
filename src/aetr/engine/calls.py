"""Step calls over HTTP: made in the serving process, or in a process of their own beside it.

The dispatcher decides what to call and what an answer means; a caller only sends one request and reads its
answer, bounded. `InlineCaller` does it with an aiohttp session in the serving process (the default).
`ProcessCaller` (AETR_STEP_CALLS=process) hands the requests to a child process (`python -m aetr.engine.calls`)
that runs an InlineCaller: aiohttp's client was a fifth of the serving process's CPU in the burst of 500 runs,
and a call handed over costs that process a sixth of it. It pays where a core is free for the child; on a busy
2-core machine it did not (docs/performance.md, "Step calls in a process of their own").

Between the two processes, over a Unix socket pair: frames of a 4-byte length and a `marshal`led tuple (both
ends are the same interpreter; nothing else holds the socket). A request is `(id, method, url,
headers, body, timeout_s, limit, keep_ok, keep)`; an answer `(id, status, content_type, retry_after, location, body,
over)`, or `(id, -1, kind, message)` for a call that got no answer. Frames written in one turn of the loop go
in one write.
"""

from __future__ import annotations

import asyncio
import functools
import io
import logging
import marshal
import signal
import socket
import struct
import subprocess
import sys
from dataclasses import dataclass
from typing import Any, Literal, cast

import aiohttp
import orjson
from aiohttp.abc import AbstractResolver, ResolveResult
from yarl import URL

from aetr.domain.hosts import AllowedHosts, address_of

log = logging.getLogger("aetr.dispatch")

STREAM_OVER_BYTES = 1024 * 1024  # bodies larger than this are streamed to the step
# Seconds the call process has to stop once told to, before it is killed; and to answer a call past its time-out.
CHILD_GRACE_S = 5.0
SWEEP_S = 1.0  # seconds between looks for calls the call process left unanswered
FailureKind = Literal["refused", "timeout", "unreachable"]
_LENGTH = struct.Struct(">I")
_FAILED = -1


@dataclass(frozen=True, slots=True)
class Answer:
    """A step's HTTP answer: its status, the headers the dispatcher reads, and the start of its body."""

    status: int
    content_type: str | None
    retry_after: str | None
    location: str | None
    body: bytes  # the first `keep` bytes
    over: bool  # the body was over `limit` bytes (and was not read past it)


class CallFailed(Exception):
    """A call that got no answer: `kind` says why (the host is not allowed, no answer in time, no connection)."""

    def __init__(self, kind: FailureKind, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class HostRefused(Exception):
    """A step's host is outside AETR_ALLOWED_STEP_HOSTS (an OSError would be taken for a retryable DNS failure)."""


class AllowListResolver(AbstractResolver):
    """Resolves names as aiohttp does, keeping only the addresses the allow-list covers (all, for a listed name).

    aiohttp connects to nothing but what its resolver returns, so a name that resolves (or is made to resolve)
    to a forbidden address is refused after resolution, not merely by its spelling.
    """

    def __init__(self, allowed: AllowedHosts) -> None:
        self._allowed = allowed
        self._inner = aiohttp.DefaultResolver()

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        """The addresses of `host` that steps may be called on; HostRefused when there are none."""
        results = await self._inner.resolve(host, port, family)
        if self._allowed.lists_name(host):
            return results
        kept = [r for r in results if (a := address_of(r["host"])) is not None and self._allowed.covers(a)]
        if not kept:
            raise HostRefused(self._allowed.refusal(host, dict.fromkeys(r["host"] for r in results)))
        return kept

    async def close(self) -> None:
        """Release the resolver underneath."""
        await self._inner.close()


async def read_bounded(resp: aiohttp.ClientResponse, limit: int, keep: int) -> tuple[bytes, bool]:
    """The first `keep` bytes of an answer's body, and whether the body is over `limit` bytes.

    The body is never read past `limit` (nor at all when its Content-Length is over it), and only what is kept
    is held: a step answering gigabytes costs no more memory than the limit.
    """
    if resp.content_length is not None and resp.content_length > limit:
        return b"", True
    chunks: list[bytes] = []
    kept = seen = 0
    async for chunk in resp.content.iter_any():
        seen += len(chunk)
        if seen > limit:
            return b"".join(chunks), True
        if kept < keep:
            chunks.append(chunk if kept + len(chunk) <= keep else chunk[:keep - kept])
            kept += len(chunks[-1])
    return b"".join(chunks), False


def _forget_frames(exc: BaseException) -> None:
    """Drop the tracebacks of a failed call's exception chain.

    aiohttp leaves a failed call's exception in a reference cycle through the frames it unwound, and those
    frames hold the request's body: a step that is down would keep every input sent to it until the next
    collection, and `aetr serve` collects rarely (see settle_heap). Only the message is kept of the failure.
    (The frames themselves are not cleared: in Python before 3.13 that would close a suspended coroutine whose
    frame a traceback happened to hold.)
    """
    seen: set[int] = set()
    chained: BaseException | None = exc
    while chained is not None and id(chained) not in seen:
        seen.add(id(chained))
        chained.__traceback__ = None
        chained = chained.__cause__ or chained.__context__


@functools.lru_cache(maxsize=256)
def _timeout(seconds: float) -> aiohttp.ClientTimeout:
    return aiohttp.ClientTimeout(total=seconds)


class InlineCaller:
    """Makes calls with one shared aiohttp session (it holds up under concurrency where httpx does not)."""

    def __init__(self, max_connections: int, allowed_hosts: AllowedHosts | None = None) -> None:
        self._max_connections = max_connections
        self._allowed_hosts = allowed_hosts
        self._session: aiohttp.ClientSession | None = None
        self._resolver: AllowListResolver | None = None

    async def start(self) -> None:
        """Open the HTTP session."""
        if self._allowed_hosts is not None:
            self._resolver = AllowListResolver(self._allowed_hosts)
        connector = aiohttp.TCPConnector(limit=self._max_connections, limit_per_host=0, ttl_dns_cache=300,
                                         resolver=self._resolver)
        # No cookie jar: a Set-Cookie in one step's answer must not ride along on later calls (another run's).
        self._session = aiohttp.ClientSession(connector=connector, cookie_jar=aiohttp.DummyCookieJar(),
                                              json_serialize=lambda v: orjson.dumps(v).decode())

    async def close(self) -> None:
        """Close the HTTP session."""
        if self._session is not None:
            await self._session.close()
        if self._resolver is not None:
            await self._resolver.close()

    async def call(self, method: str, url: str, headers: dict[str, str], body: bytes, timeout_s: float,
                   limit: int, keep_ok: int, keep: int) -> Answer:
        """Send one request to `url` (already encoded) and read its answer: at most `keep_ok` bytes of a 2xx
        answer's body and `keep` of another's, and whether the body is over `limit`. CallFailed when there is no
        answer."""
        assert self._session is not None, "start() first"
        # aiohttp streams file-like bodies instead of writing a large one in one go
        payload: bytes | io.BytesIO = io.BytesIO(body) if len(body) > STREAM_OVER_BYTES else body
        cause: BaseException
        try:
            # Redirects are not followed: they would carry the input and the callback token to wherever
            # Location points (and a 301/302 turns the POST into a GET without its body).
            async with self._session.request(method, URL(url, encoded=True), data=payload, headers=headers,
                                             allow_redirects=False, timeout=_timeout(timeout_s)) as resp:
                status, content_type = resp.status, resp.headers.get("Content-Type")
                retry_after, location = resp.headers.get("Retry-After"), resp.headers.get("Location")
                kept, over = await read_bounded(resp, limit, keep_ok if 200 <= status < 300 else keep)
                if over:
                    resp.close()  # the rest is never read: drop the connection rather than drain it
                return Answer(status, content_type, retry_after, location, kept, over)
        except HostRefused as exc:
            failure, cause = CallFailed("refused", str(exc)), exc
        except TimeoutError as exc:
            failure, cause = CallFailed("timeout", f"no answer within {timeout_s:g} s"), exc
        except (aiohttp.ClientError, OSError) as exc:
            failure, cause = CallFailed("unreachable", str(exc) or type(exc).__name__), exc
        _forget_frames(cause)
        del cause
        try:
            raise failure  # outside the handlers: not chained to the exception whose frames held the body
        finally:
            del failure  # this frame, which holds the body, must not stay in a cycle with the traceback


class ProcessCaller:
    """Makes calls in a child process of its own (`python -m aetr.engine.calls`), started on first use and again
    after it stopped. A call under way when the child stops fails as `unreachable`: its attempt is tried again,
    as for a step that dropped the connection."""

    def __init__(self, max_connections: int, allowed_hosts: AllowedHosts | None = None) -> None:
        self._max_connections = max_connections
        self._allowed_hosts = allowed_hosts
        self._child: _Child | None = None
        self._starting: asyncio.Task[_Child] | None = None
        self._closed = False

    async def start(self) -> None:
        """Start the child process."""
        await self._the_child()

    async def close(self) -> None:
        """Stop the child process; calls still under way fail."""
        self._closed = True
        if self._starting is not None:
            await asyncio.gather(self._starting, return_exceptions=True)
        if self._child is not None:
            await self._child.stop()

    @property
    def pid(self) -> int | None:
        """The child's process id, while it runs."""
        return self._child.pid if self._child is not None and not self._child.gone else None

    async def _the_child(self) -> _Child:
        while self._child is None or self._child.gone:
            if self._closed:
                raise CallFailed("unreachable", "AETR is stopping")
            if self._starting is None:
                self._starting = asyncio.create_task(self._spawn(), name="aetr-calls-start")
                self._starting.add_done_callback(self._started)
            try:
                await asyncio.shield(self._starting)
            except OSError as exc:
                raise CallFailed("unreachable", f"AETR's call process did not start: {exc}") from None
        return self._child

    def _started(self, task: asyncio.Task[_Child]) -> None:
        self._starting = None
        if not task.cancelled() and task.exception() is None:
            self._child = task.result()

    async def _spawn(self) -> _Child:
        ours, theirs = socket.socketpair()
        try:
            command = [sys.executable, "-m", "aetr.engine.calls", str(self._max_connections),
                       str(self._allowed_hosts or ""), str(theirs.fileno())]
            # Forking this process takes a few milliseconds: not on the loop's thread.
            process = await asyncio.to_thread(subprocess.Popen, command, stdin=subprocess.DEVNULL,
                                              pass_fds=(theirs.fileno(),))
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()  # the child has its own copy: its end closes when the child exits
        child = _Child(process)
        await asyncio.get_running_loop().create_unix_connection(lambda: child, sock=ours)
        return child

    async def call(self, method: str, url: str, headers: dict[str, str], body: bytes, timeout_s: float,
                   limit: int, keep_ok: int, keep: int) -> Answer:
        """As InlineCaller.call, in the child process (which keeps the time-out)."""
        child = await self._the_child()
        reply = await child.send((method, url, headers, body, timeout_s, limit, keep_ok, keep), timeout_s)
        if reply[0] == _FAILED:
            raise CallFailed(reply[1], reply[2])
        return Answer(*reply)


class _Frames(asyncio.Protocol):
    """One end of the socket between a serving process and its call process: tuples out and in as frames.

    Frames written in one turn of the loop go in one write; each whole frame read is handed to `received`.
    """

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._out: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports do not derive from asyncio's

    def write(self, values: tuple[Any, ...]) -> None:
        """Send a tuple of plain values (marshal's), with the others of this turn of the loop."""
        frame = marshal.dumps(values)
        if not self._out:
            asyncio.get_running_loop().call_soon(self._flush)
        self._out += (_LENGTH.pack(len(frame)), frame)

    def _flush(self) -> None:
        out, self._out = self._out, []
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(b"".join(out))

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        at, end = 0, len(buffer)
        while end - at >= 4:
            (size,) = _LENGTH.unpack_from(buffer, at)
            if end - at - 4 < size:
                break
            values = marshal.loads(buffer[at + 4:at + 4 + size])
            at += 4 + size
            self.received(values)
        del buffer[:at]

    def received(self, values: tuple[Any, ...]) -> None:
        """A whole frame came."""
        raise NotImplementedError


class _Child(_Frames):
    """The serving process's end of its socket to the call process: requests out, answers in, by id.

    A Unix socket pair rather than the child's stdin and stdout: uvloop's subprocess pipes have been known to
    leave data unwritten (MagicStack/uvloop#312), and its stream sockets are its most travelled path. The socket
    also says when the child is gone: its end closes when the child exits, however it exits.
    """

    def __init__(self, process: subprocess.Popen[bytes]) -> None:
        super().__init__()
        self.gone = False
        self.pid = process.pid
        self._process = process
        # Each call's answer to come, by id, and the loop time by which the child must have answered it.
        self._waiting: dict[int, tuple[asyncio.Future[tuple[Any, ...]], float]] = {}
        self._sweep: asyncio.TimerHandle | None = None
        self._next = 0

    def send(self, request: tuple[Any, ...], timeout_s: float) -> asyncio.Future[tuple[Any, ...]]:
        if self.gone:
            raise CallFailed("unreachable", "AETR's call process stopped")
        loop = asyncio.get_running_loop()
        self._next += 1
        future: asyncio.Future[tuple[Any, ...]] = loop.create_future()
        # Forgotten when its answer comes (a caller that went away leaves it until then), or by the sweep.
        self._waiting[self._next] = (future, loop.time() + timeout_s + CHILD_GRACE_S)
        self.write((self._next, *request))
        if self._sweep is None:
            self._sweep = loop.call_later(SWEEP_S, self._fail_overdue)
        return future

    def _fail_overdue(self) -> None:
        """Fail the calls the child has not answered well past their time-out (it applies the time-out itself:
        this is for a child that has stopped working without exiting), so that no call waits for ever."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        overdue = [key for key, (_, deadline) in self._waiting.items() if deadline < now]
        for key in overdue:
            future, _ = self._waiting.pop(key)
            if not future.done():
                future.set_exception(CallFailed("timeout", "AETR's call process gave no answer in time"))
        if overdue:
            log.warning("the call process (pid %s) left %d calls unanswered past their time-out", self.pid,
                        len(overdue))
        self._sweep = loop.call_later(SWEEP_S, self._fail_overdue) if self._waiting and not self.gone else None

    def received(self, values: tuple[Any, ...]) -> None:
        waiting = self._waiting.pop(values[0], None)
        if waiting is not None and not waiting[0].done():
            waiting[0].set_result(values[1:])

    def connection_lost(self, exc: Exception | None) -> None:
        self.gone = True
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        code = self._process.poll()
        waiting, self._waiting = self._waiting, {}
        for future, _ in waiting.values():
            if not future.done():
                future.set_exception(CallFailed("unreachable", "AETR's call process stopped"))
        if waiting:
            log.warning("the call process (pid %s) stopped with %d calls under way; their attempts are tried again",
                        self.pid, len(waiting))
        if code is None:  # its socket closed first: reap it once it has exited (it has, or it ends now)
            asyncio.get_running_loop().run_in_executor(None, self._reap)

    def _reap(self) -> None:
        try:
            self._process.wait(CHILD_GRACE_S)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()

    async def stop(self) -> None:
        """Close the socket (the child stops at its end) and wait for the child to exit; kill it past the grace."""
        if self.transport is not None:
            self.transport.close()
        await asyncio.to_thread(self._reap)


async def _serve(max_connections: int, allowed: AllowedHosts | None, fd: int) -> None:
    """The call process: read requests from the socket, make them, write each answer back as it comes."""
    loop = asyncio.get_running_loop()
    caller = InlineCaller(max_connections, allowed)
    await caller.start()
    tasks: set[asyncio.Task[None]] = set()
    ended = loop.create_future()

    class Requests(_Frames):
        def received(self, values: tuple[Any, ...]) -> None:
            key, *request = values
            task = loop.create_task(self.one(key, tuple(request)))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

        def connection_lost(self, exc: Exception | None) -> None:
            if not ended.done():
                ended.set_result(None)

        async def one(self, key: int, request: tuple[Any, ...]) -> None:
            try:
                answer = await caller.call(*request)
            except CallFailed as exc:
                self.write((key, _FAILED, exc.kind, str(exc)))
            except Exception as exc:  # a bug here must not leave the serving process waiting
                log.exception("call %d failed", key)
                self.write((key, _FAILED, "unreachable", f"AETR's call process: {type(exc).__name__}: {exc}"))
            else:
                self.write((key, answer.status, answer.content_type, answer.retry_after, answer.location,
                            answer.body, answer.over))

    await loop.create_unix_connection(Requests, sock=socket.socket(fileno=fd))
    await ended  # the serving process closed its end, or stopped
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await caller.close()


def main() -> None:
    """Entry point of the call process: `python -m aetr.engine.calls MAX_CONNECTIONS ALLOWED_HOSTS SOCKET_FD`."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Ctrl-C in a terminal reaches the whole process group: the serving process stops, and closes its end.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    max_connections, hosts, fd = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    allowed = AllowedHosts.parse(hosts) if hosts else None
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvicorn[standard] brings it
        asyncio.run(_serve(max_connections, allowed, fd))
    else:
        uvloop.run(_serve(max_connections, allowed, fd))


if __name__ == "__main__":
    main()
