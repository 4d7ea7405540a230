"""A fake step service on loopback whose behaviour per path a test chooses, and which records what it saw."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Final, NamedTuple, Self

import aiohttp
import orjson
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy, MultiDict, MultiDictProxy

__all__ = [
    "Behaviour",
    "Call",
    "CallbackAnswer",
    "StepRequest",
    "StepService",
]

CALLBACK_TIMEOUT_S: Final = 30.0  # seconds; one callback POST to AETR
CALLBACK_HEADER: Final = "AETR-Callback"
CALLBACK_QUERY: Final = "aetr"


@dataclass(frozen=True, slots=True)
class Call:
    """One request the step service received."""

    path: str
    method: str
    headers: CIMultiDictProxy[str]
    query: MultiDictProxy[str]
    json: Any  # the decoded JSON body; None when the body is empty or not JSON
    body: bytes
    received_at: float  # time.monotonic()

    @property
    def callback_url(self) -> str | None:
        """Where AETR wants the callback: the `AETR-Callback` header, else the `aetr` query parameter."""
        return self.headers.get(CALLBACK_HEADER) or self.query.get(CALLBACK_QUERY)

    @property
    def run_id(self) -> str | None:
        """The `AETR-Run-Id` header."""
        return self.headers.get("AETR-Run-Id")

    @property
    def node_id(self) -> str | None:
        """The `AETR-Node-Id` header."""
        return self.headers.get("AETR-Node-Id")

    @property
    def attempt(self) -> int | None:
        """The `AETR-Attempt` header as an int."""
        value = self.headers.get("AETR-Attempt")
        try:
            return int(value) if value is not None else None
        except ValueError:
            return None


class CallbackAnswer(NamedTuple):
    """What AETR answered to one callback the service sent: `(status, json)`."""

    status: int
    json: Any


@dataclass(eq=False)
class StepRequest:
    """One request being handled: what a behaviour gets to answer it and to call AETR back."""

    call: Call
    service: StepService = field(repr=False)

    @property
    def input(self) -> Any:
        """The step's input: the request's JSON body."""
        return self.call.json

    async def send_output(self, output: Any) -> CallbackAnswer:
        """POST the step's output to the callback URL; return AETR's answer."""
        return await self.service._send_callback(self.call, "", output)

    async def send_failure(self, error: str, retryable: bool = False) -> CallbackAnswer:
        """POST a failure to `<callback>/fail`; return AETR's answer."""
        return await self.service._send_callback(self.call, "/fail", {"error": error, "retryable": retryable})

    async def send_heartbeat(self) -> CallbackAnswer:
        """POST to `<callback>/heartbeat`; return AETR's answer."""
        return await self.service._send_callback(self.call, "/heartbeat", None)

    def later(self, work: Coroutine[Any, Any, Any]) -> None:
        """Run `work` after the answer, as a task the service owns and cancels when it closes."""
        self.service._spawn(work)


Behaviour = Callable[[StepRequest], Awaitable[web.StreamResponse]]


class StepService:
    """An aiohttp server on loopback playing the step services of a test: `async with StepService() as svc:`."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, record: bool = True) -> None:
        self.host = host
        self._port = port
        self._record = record
        self._routes: dict[str, Behaviour] = {}
        self._calls: list[Call] = []
        self._answers: defaultdict[str, list[CallbackAnswer]] = defaultdict(list)
        self._errors: list[str] = []
        self._changed = asyncio.Condition()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def start(self) -> None:
        """Listen on `host:port` (port 0: any free port)."""
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self._port)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self._port = int(runner.addresses[0][1])
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=CALLBACK_TIMEOUT_S))

    async def close(self) -> None:
        """Stop listening, cancel pending callbacks and close the callback session."""
        # Stop the server first so that no request can start new background work behind our back.
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def port(self) -> int:
        """The port the service listens on."""
        if self._runner is None:
            raise RuntimeError("StepService is not started: use `async with StepService() as svc:`")
        return self._port

    @property
    def base_url(self) -> str:
        """`http://host:port`, without a trailing slash."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def url(self, path: str) -> str:
        """The full URL of `path` on this service, for a step's `url`."""
        return f"{self.base_url}{_checked_path(path)}"

    def route(self, path: str, behaviour: Behaviour) -> None:
        """Answer every request to `path` (any method) with `behaviour`; replaces an earlier one."""
        self._routes[_checked_path(path)] = behaviour

    def calls(self, path: str | None = None) -> list[Call]:
        """The requests received so far on `path` (or on any path), oldest first."""
        return [call for call in self._calls if path is None or call.path == path]

    def callback_answers(self, path: str) -> list[CallbackAnswer]:
        """AETR's answers to the callbacks sent for requests on `path`, in the order they came."""
        return list(self._answers[_checked_path(path)])

    @property
    def errors(self) -> list[str]:
        """Problems met in the background (a behaviour raising, AETR unreachable for a callback)."""
        return list(self._errors)

    # Both waits take `timeout` like the rest of the test helpers; asyncio.timeout would lose the message.
    async def wait_for_calls(self, path: str, n: int, timeout: float = 5.0) -> list[Call]:  # noqa: ASYNC109
        """Wait until `path` has received at least `n` requests; return them all."""
        path = _checked_path(path)
        await self._wait(
            lambda: len(self.calls(path)) >= n,
            timeout,
            lambda: f"expected {n} request(s) to {path} within {timeout:g}s, got {len(self.calls(path))}",
        )
        return self.calls(path)

    async def wait_for_callback_answers(
        self,
        path: str,
        n: int,
        timeout: float = 5.0,  # noqa: ASYNC109 -- see wait_for_calls
    ) -> list[CallbackAnswer]:
        """Wait until `n` callbacks for `path` have been answered by AETR; return the answers."""
        path = _checked_path(path)
        await self._wait(
            lambda: len(self._answers[path]) >= n,
            timeout,
            lambda: f"expected {n} callback answer(s) for {path} within {timeout:g}s, got {len(self._answers[path])}",
        )
        return self.callback_answers(path)

    async def _wait(self, done: Callable[[], bool], timeout: float, message: Callable[[], str]) -> None:  # noqa: ASYNC109
        """Wait on the condition until `done()`, or raise TimeoutError with `message()` and known errors."""
        try:
            async with asyncio.timeout(timeout), self._changed:
                await self._changed.wait_for(done)
        except TimeoutError:
            errors = f"; errors in the step service: {self._errors}" if self._errors else ""
            raise TimeoutError(message() + errors) from None

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    def _spawn(self, work: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(self._guarded(work))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _guarded(self, work: Coroutine[Any, Any, Any]) -> None:
        """Run background work; keep its exception for the test instead of losing it in a task."""
        try:
            await work
        except Exception as exc:
            self._errors.append(f"{type(exc).__name__}: {exc}")
            await self._notify()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        try:
            decoded = orjson.loads(body) if body else None
        except orjson.JSONDecodeError:
            decoded = None
        call = Call(
            path=request.path,
            method=request.method,
            headers=CIMultiDictProxy(CIMultiDict(request.headers)),
            query=MultiDictProxy(MultiDict(request.query)),
            json=decoded,
            body=body,
            received_at=time.monotonic(),
        )
        if self._record:
            self._calls.append(call)
            await self._notify()
        behaviour = self._routes.get(call.path)
        if behaviour is None:
            known = ", ".join(sorted(self._routes)) or "none"
            return _json_response(404, {"detail": f"no behaviour for {call.path} (routes: {known})"})
        try:
            return await behaviour(StepRequest(call, self))
        except Exception as exc:
            # A behaviour that raises is a bug in the test: say so to AETR and to the test.
            self._errors.append(f"{call.path}: {type(exc).__name__}: {exc}")
            await self._notify()
            return _json_response(500, {"detail": f"step service behaviour raised {type(exc).__name__}: {exc}"})

    async def _send_callback(self, call: Call, suffix: str, payload: Any) -> CallbackAnswer:
        if self._session is None:
            raise RuntimeError("StepService is closed")
        url = call.callback_url
        if url is None:
            raise ValueError(f"request to {call.path} carries no {CALLBACK_HEADER} header nor ?{CALLBACK_QUERY}=")
        data = orjson.dumps(payload) if payload is not None else b""
        headers = {"Content-Type": "application/json"} if payload is not None else {}
        async with self._session.post(url + suffix, data=data, headers=headers) as response:
            raw = await response.read()
            try:
                answer = CallbackAnswer(response.status, orjson.loads(raw) if raw else None)
            except orjson.JSONDecodeError:
                answer = CallbackAnswer(response.status, raw.decode("utf-8", "replace"))
        if self._record:
            self._answers[call.path].append(answer)
            await self._notify()
        return answer


def _checked_path(path: str) -> str:
    if not path.startswith("/"):
        raise ValueError(f"a path starts with '/': got {path!r}")
    return path


def _json_response(status: int, body: Any) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(body), content_type="application/json")


async def call_fn(fn: Callable[[Any], Any], value: Any) -> Any:
    """Call a sync or async `fn(value)` and return its result."""
    result = fn(value)
    if inspect.isawaitable(result):
        result = await result
    return result
