"""The sandbox: a pool of worker processes, each hosting one hardened V8 isolate, that runs user scripts.

Each worker serves one thread at a time; a caller that finds none idle waits for one (waiting does not
count against its time limit), and workers start on first use. A worker whose script broke a limit is
killed and replaced by a fresh one on a later call, so no state or runaway work survives a failure.

Values cross as JSON text: arguments are encoded here and parsed inside V8 with `JSON.parse`; results come
back from `JSON.stringify` and are parsed here. JSON rules therefore apply: NaN and the infinities become
null, object properties that are undefined or functions are dropped, and a result that is itself
undefined, a function, a symbol, a BigInt or a Promise is a ScriptError. Numbers are doubles inside V8:
integers beyond 2**53 lose precision, and an integral double that large comes back as the Python int of
its shortest decimal form (5.659388098164282e16 as 56593880981642820), the same JSON number.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Final

import orjson

from aetr.sandbox.errors import ScriptError
from aetr.sandbox.limits import MIB, SandboxLimits
from aetr.sandbox.process import WorkerCrashed, WorkerProcess, WorkerTimeout
from aetr.sandbox.protocol import OP_CALL, OP_CHECK, RESULT, SCRIPT_ERROR

log = logging.getLogger("aetr.sandbox")

MAX_RESULT_DEPTH: Final = 1024  # orjson's nesting limit when parsing
# A request of at most this many characters is under 64 KiB of UTF-8: it fits in an empty pipe, so writing
# it never blocks the event loop. Results up to the same size are parsed on the loop too.
INLINE_CHARS: Final = 16_000


def _encode_args(args: list[Any]) -> str:
    """Encode call arguments as a JSON array."""
    try:
        return orjson.dumps(args).decode()
    except TypeError:
        pass
    # orjson refuses integers beyond 64 bits, nesting beyond 254 levels and lone surrogates; json does not.
    try:
        return json.dumps(args, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError, RecursionError) as e:
        raise TypeError(f"sandbox arguments must be JSON values: {e}") from e


def _decode_result(payload: bytes) -> Any:
    """Parse the JSON text a script returned."""
    try:
        return orjson.loads(payload)
    except orjson.JSONDecodeError:
        pass
    # orjson refuses nesting beyond 1024 levels and the escaped lone surrogates JSON.stringify writes. Python's
    # parser nests as deep as the interpreter lets it recurse (about 1,000 levels on 3.11, many more on 3.13),
    # so the depth is checked on what it read: the same answer whichever Python runs AETR.
    try:
        value = json.loads(payload)
        too_deep = _nests_deeper(value, MAX_RESULT_DEPTH)
    except RecursionError:
        too_deep = True
    if not too_deep:
        return value
    raise ScriptError(
        f"the script's result is nested more than {MAX_RESULT_DEPTH} levels deep; return a flatter value",
        kind="not_json",
    )


def _nests_deeper(value: Any, limit: int) -> bool:
    """Whether arrays and objects nest more than `limit` levels inside `value` (walked without recursing)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            item = item.values()
        elif not isinstance(item, list):
            continue
        if depth > limit:
            return True
        stack.extend((sub, depth + 1) for sub in item if isinstance(sub, dict | list))
    return False


def _script_error(payload: bytes) -> ScriptError:
    """Rebuild the ScriptError a worker described."""
    described = json.loads(payload)
    return ScriptError(described["message"], kind=described["kind"], line=described["line"],
                       column=described.get("column"))


class Sandbox:
    """Run user JavaScript mappers and reducers in a pool of hardened V8 isolates."""

    def __init__(
        self,
        limits: SandboxLimits = SandboxLimits(),  # noqa: B008 -- frozen, so one shared default is safe
        pool_size: int = 4,
        public_api_only: bool = False,
    ) -> None:
        """`public_api_only`: call V8 only through mini-racer's public API, as when its internals are gone."""
        if pool_size < 1:
            raise ValueError(f"pool_size must be at least 1, got {pool_size}")
        self.limits = limits
        self._pool_size = pool_size
        self._public_api_only = public_api_only
        self._idle: list[WorkerProcess] = []  # a stack: the most recently used worker has the warmest caches
        self._live = 0  # workers started and not yet stopped, idle or in use
        self._closed = False
        self._available = threading.Condition()
        self._executor = ThreadPoolExecutor(max_workers=pool_size, thread_name_prefix="aetr-sandbox")
        # Runs on close(), on garbage collection and at interpreter exit, so no worker outlives the sandbox.
        self._stop_idle = weakref.finalize(self, _stop_workers, self._idle)

    def call(self, source: str, args: list[Any]) -> Any:
        """Call `source` (compiled once per source) with JSON `args`, return its JSON value; blocking, thread-safe."""
        return _decode_result(self._request(OP_CALL, source, _encode_args(args)))

    async def acall(self, source: str, args: list[Any]) -> Any:
        """Same, run on the sandbox's own worker threads so the asyncio loop never blocks."""
        argument = _encode_args(args)
        loop = asyncio.get_running_loop()
        # Fast path: with a worker idle and a request that fits in the pipe, writing never blocks and
        # the loop can wait for the answer itself, saving the hop to a thread.
        if len(argument) + len(source) <= INLINE_CHARS and _loop_watches_pipes(loop):
            worker = self._checkout_idle()
            if worker is not None:
                payload = await self._arequest(worker, OP_CALL, source, argument)
                if len(payload) <= 4 * INLINE_CHARS:
                    return _decode_result(payload)
                return await loop.run_in_executor(self._executor, _decode_result, payload)
        call = functools.partial(self._request, OP_CALL, source, argument)
        return _decode_result(await loop.run_in_executor(self._executor, call))

    def check(self, source: str) -> None:
        """Raise ScriptError(kind="syntax") if `source` does not compile to a callable (validates mappers on save)."""
        self._request(OP_CHECK, source, "")

    def close(self) -> None:
        """Stop every worker; calls in progress finish first, later calls raise RuntimeError."""
        with self._available:
            if self._closed:
                return
            self._closed = True
            self._live -= len(self._idle)
            self._available.notify_all()
        self._stop_idle()
        self._executor.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _request(self, op: bytes, source: str, argument: str) -> bytes:
        """Run one request on a worker; return the result's JSON text or raise the ScriptError."""
        worker = self._checkout()
        reusable = False
        try:
            tag, payload = worker.request(op, source, argument)
            reusable = _reusable(tag, payload)
        except WorkerTimeout:
            raise self._timeout_error() from None
        except WorkerCrashed as e:
            raise self._crash_error(e) from None
        finally:
            self._checkin(worker, reusable)
        return _result(tag, payload)

    async def _arequest(self, worker: WorkerProcess, op: bytes, source: str, argument: str) -> bytes:
        """Run one request on a checked-out worker without blocking the loop."""
        reusable = False
        try:
            tag, payload = await worker.arequest(op, source, argument)
            reusable = _reusable(tag, payload)
        except WorkerTimeout:
            raise self._timeout_error() from None
        except WorkerCrashed as e:
            raise self._crash_error(e) from None
        finally:
            # A cancelled caller leaves an answer in flight, so the worker is not reusable then either.
            self._checkin(worker, reusable)
        return _result(tag, payload)

    def _timeout_error(self) -> ScriptError:
        """The error for a call that ran out of time."""
        return ScriptError(self.limits.timeout_message(), kind="timeout")

    def _crash_error(self, crash: WorkerCrashed) -> ScriptError:
        """The error for a call whose worker process died under it."""
        return ScriptError(
            f"script exceeded what the sandbox can hold and its process stopped ({crash.reason}): allocate less "
            f"(the memory limit is {self.limits.memory_limit_bytes / MIB:g} MiB; raise it with AETR_SANDBOX_MEMORY_MB)",
            kind="memory",
        )

    def _checkout_idle(self) -> WorkerProcess | None:
        """Take an idle, running worker without waiting, if there is one."""
        with self._available:
            while self._idle and not self._closed:
                worker = self._idle.pop()
                if worker.alive:
                    return worker
                self._live -= 1
                worker.kill()
        return None

    def _checkout(self) -> WorkerProcess:
        """Take an idle worker, or start one if the pool has room, or wait for one."""
        with self._available:
            while True:
                if self._closed:
                    raise RuntimeError("the sandbox is closed")
                while self._idle:
                    worker = self._idle.pop()
                    if worker.alive:
                        return worker
                    self._live -= 1
                    worker.kill()
                if self._live < self._pool_size:
                    self._live += 1
                    break
                self._available.wait()
        try:
            worker = WorkerProcess(self.limits, public_api_only=self._public_api_only)
            _log_calls_through(worker.calls_through)
            return worker
        except BaseException:
            with self._available:
                self._live -= 1
                self._available.notify()
            raise

    def _checkin(self, worker: WorkerProcess, reusable: bool) -> None:
        """Return a worker to the pool, or stop it if it cannot be reused or the sandbox closed."""
        with self._available:
            keep = reusable and not self._closed
            if keep:
                self._idle.append(worker)
            else:
                self._live -= 1
            self._available.notify()
        if not keep:
            worker.kill()


def _reusable(tag: bytes, payload: bytes) -> bool:
    """Whether a worker may serve again after this answer: not after a memory failure."""
    if tag == RESULT:
        return True
    return tag == SCRIPT_ERROR and json.loads(payload)["kind"] != "memory"


def _result(tag: bytes, payload: bytes) -> bytes:
    """Return a worker's result payload, or raise the ScriptError it describes."""
    if tag == RESULT:
        return payload
    if tag == SCRIPT_ERROR:
        raise _script_error(payload)
    raise RuntimeError(f"the sandbox worker answered with an unknown tag {tag!r}")


@functools.cache
def _log_calls_through(calls_through: str) -> None:
    """Say once per process how sandbox workers reach V8 (again only if it changes)."""
    log.info("JavaScript runs in V8 through %s", calls_through)


def _stop_workers(workers: list[WorkerProcess]) -> None:
    """Kill and forget `workers`."""
    while workers:
        workers.pop().kill()


def _loop_watches_pipes(loop: asyncio.AbstractEventLoop) -> bool:
    """Whether `loop` can wait on a pipe (selector loops can; the Windows proactor cannot)."""
    return not isinstance(loop, getattr(asyncio, "ProactorEventLoop", ()))
