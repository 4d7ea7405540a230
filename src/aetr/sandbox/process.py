"""The parent's handle on one sandbox worker process, which hosts one hardened V8 isolate.

Why a process: V8 aborts its whole process on some allocations no heap limit catches, from C++ builtins
that also ignore TerminateExecution (`new Array(1e9).fill(0)`, `'ab'.repeat(2**27).split('')`). In a
worker, such a script kills only the worker, and the time limit is a SIGKILL that nothing can ignore.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Final

import aetr
from aetr.sandbox.limits import SandboxLimits
from aetr.sandbox.protocol import READY, RESPONSE_HEADER, WORKER_FAILURE, encode_request, write_all

STARTUP_TIMEOUT_S: Final = 30.0  # seconds for a worker to start Python and V8 (about 0.25 s when idle)
EXIT_WAIT_S: Final = 2.0  # seconds to wait for a worker that closed its pipe to finish exiting
RESPONSE_SLACK_S: Final = 0.1  # seconds allowed on top of the time limit for moving bytes through pipes
READ_CHUNK_BYTES: Final = 1 << 16


class WorkerTimeout(Exception):
    """The worker did not answer in time; it has been killed."""


class WorkerCrashed(Exception):
    """The worker process died; `reason` says how."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _worker_environment() -> dict[str, str]:
    """The parent's environment without AETR's settings, and with aetr's directory first on PYTHONPATH."""
    # The worker needs none of AETR's settings, and its secrets have no business near untrusted code.
    env = {name: value for name, value in os.environ.items() if not name.startswith("AETR_")}
    package_root = str(Path(aetr.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    return env


def _describe_exit(code: int | None) -> str:
    """Say how a process ended, from its return code."""
    if code is None:
        return "it stopped answering"
    if code < 0:
        try:
            return f"it was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"it was killed by signal {-code}"
    return f"it exited with status {code}"


class WorkerProcess:
    """The parent's handle on one sandbox worker process, used by one thread or task at a time."""

    def __init__(self, limits: SandboxLimits, public_api_only: bool = False) -> None:
        self._limits = limits
        command = [sys.executable, "-m", "aetr.sandbox.worker", repr(limits.time_limit_s),
                   str(limits.memory_limit_bytes), *(["public-api"] if public_api_only else [])]
        self._process = subprocess.Popen(
            command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=_worker_environment(),
            close_fds=True,
            # Its own session, so a Ctrl-C in the terminal reaches the parent only, which shuts workers down.
            start_new_session=True,
        )
        self._requests: IO[bytes] = self._pipe(self._process.stdin)
        self._responses: IO[bytes] = self._pipe(self._process.stdout)
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._responses.fileno(), selectors.EVENT_READ)
        self._buffer = bytearray()
        try:
            tag, payload = self._receive(time.monotonic() + STARTUP_TIMEOUT_S)
            if tag != READY:
                raise RuntimeError(f"the sandbox worker sent {tag!r} instead of READY: {payload!r}")
            self.calls_through = payload.decode(errors="replace")  # e.g. "mini-racer 0.14.1's internals"
        except (WorkerTimeout, WorkerCrashed) as e:
            self.kill()
            raise RuntimeError(f"the sandbox worker process did not start: {e}") from e
        except BaseException:
            self.kill()
            raise

    @property
    def alive(self) -> bool:
        """Whether the worker process is still running."""
        return self._process.poll() is None

    def request(self, op: bytes, source: str, argument: str) -> tuple[bytes, bytes]:
        """Send one request and return the response's tag and payload; kill the worker if it overruns."""
        return self._receive(self._send(op, source, argument))

    async def arequest(self, op: bytes, source: str, argument: str) -> tuple[bytes, bytes]:
        """Same, waiting on the running event loop instead of blocking a thread."""
        loop = asyncio.get_running_loop()
        deadline = self._send(op, source, argument)
        fd = self._responses.fileno()
        complete: asyncio.Future[None] = loop.create_future()

        def on_readable() -> None:
            try:
                self._read_chunk(fd)
            except WorkerCrashed as e:
                complete.set_exception(e)
                return
            if self._has_frame():
                complete.set_result(None)

        loop.add_reader(fd, on_readable)
        try:
            async with asyncio.timeout(deadline - time.monotonic()):
                await complete
        except TimeoutError:
            self.kill()
            raise WorkerTimeout from None
        finally:
            loop.remove_reader(fd)
        return self._take_frame()

    def kill(self) -> None:
        """Stop the worker at once, whatever it is doing."""
        if self._process.poll() is None:
            self._process.kill()
        self._process.wait()
        self._selector.close()
        for pipe in (self._requests, self._responses):
            # A pipe to a killed process may fail to flush; it is closed regardless.
            with contextlib.suppress(OSError):
                pipe.close()

    def _send(self, op: bytes, source: str, argument: str) -> float:
        """Write one request and return the deadline for its response."""
        deadline = time.monotonic() + self._limits.time_limit_s + RESPONSE_SLACK_S
        try:
            write_all(self._requests.fileno(), encode_request(op, source, argument))
        except BrokenPipeError:
            raise self._crashed() from None
        return deadline

    def _receive(self, deadline: float) -> tuple[bytes, bytes]:
        """Block until a whole response frame has arrived, or the deadline passes (killing the worker)."""
        fd = self._responses.fileno()
        while not self._has_frame():
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self._selector.select(remaining):
                self.kill()
                raise WorkerTimeout
            self._read_chunk(fd)
        return self._take_frame()

    def _read_chunk(self, fd: int) -> None:
        """Append what the worker has written to the buffer; raise WorkerCrashed at end of file."""
        chunk = os.read(fd, READ_CHUNK_BYTES)
        if not chunk:
            raise self._crashed()
        self._buffer += chunk

    def _has_frame(self) -> bool:
        """Whether the buffer holds a whole response frame."""
        if len(self._buffer) < RESPONSE_HEADER.size:
            return False
        _, size = RESPONSE_HEADER.unpack_from(self._buffer)
        return len(self._buffer) >= RESPONSE_HEADER.size + int(size)

    def _take_frame(self) -> tuple[bytes, bytes]:
        """Remove the whole frame at the start of the buffer and return its tag and payload."""
        tag, size = RESPONSE_HEADER.unpack_from(self._buffer)
        end = RESPONSE_HEADER.size + int(size)
        payload = bytes(self._buffer[RESPONSE_HEADER.size : end])
        del self._buffer[:end]
        if tag == WORKER_FAILURE:
            self.kill()
            raise RuntimeError(f"the sandbox worker failed:\n{payload.decode(errors='replace')}")
        return bytes(tag), payload

    def _crashed(self) -> WorkerCrashed:
        """Reap a worker that closed its pipe and say how it ended."""
        try:
            code: int | None = self._process.wait(EXIT_WAIT_S)
        except subprocess.TimeoutExpired:
            code = None
        self.kill()
        return WorkerCrashed(_describe_exit(code))

    @staticmethod
    def _pipe(pipe: IO[bytes] | None) -> IO[bytes]:
        """Return a pipe Popen was asked to create."""
        if pipe is None:
            raise RuntimeError("the sandbox worker's pipe was not created")
        return pipe
