"""A cheap step service for the benchmarks: answers 202 at once, then posts the callback, and records times.

Run it as its own process: `python benchmarks/stepsvc.py --port P`. It is a bare asyncio HTTP/1.1 server and
client (no framework) on uvloop when installed, so that it costs little next to the AETR process it measures.

Paths (any method but the control routes):
  /step   answer 202, then POST `{"ok": true}` to the `AETR-Callback` URL
  /echo   answer 202, then POST the request's own body back as the output
  /hold   answer 202 and never call back
Control routes:
  POST /gate?closed=1             hold every callback from now on (the steps' requests are still answered)
  POST /gate?closed=0             send the held callbacks and stop holding; answers {"released": N, "at": ns}
  GET  /stats                     every recorded request and callback (times are time.time_ns(), wall clock)
  GET  /wait?requests=N&accepted=N&timeout=S   answer once the counters reach N (408 when S seconds pass)
  POST /reset                     forget everything recorded
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time
from dataclasses import dataclass, field
from typing import Final
from urllib.parse import parse_qs, urlsplit

import orjson

CALLBACK_POOL_SIZE: Final = 32  # concurrent callback connections to AETR (the rest queue for one)
CALLBACK_ATTEMPTS: Final = 5  # a callback whose connection breaks is sent again this many times at most
CALLBACK_RETRY_S: Final = 0.05  # seconds between two attempts of one callback
CALLBACK_TIMEOUT_S: Final = 120.0  # seconds AETR may take to answer one callback (a 10,000-child parent is slow)
MAX_WAIT_S: Final = 3600.0  # seconds a /wait request may ask for
OK_BODY: Final = b'{"ok":true}'

Connection = tuple[asyncio.StreamReader, asyncio.StreamWriter]


@dataclass
class Recorder:
    """What the service saw, kept as flat lists so /stats stays cheap to encode."""

    # [arrival_ns, path, run_id, node_id, attempt]
    requests: list[tuple[int, str, str, str, int]] = field(default_factory=list)
    # [node_id, attempt, sent_ns, answered_ns, status, accepted]
    callbacks: list[tuple[str, int, int, int, int, bool]] = field(default_factory=list)
    callback_errors: list[str] = field(default_factory=list)
    accepted: int = 0
    waiters: list[tuple[str, int, asyncio.Future[None]]] = field(default_factory=list)

    def counter(self, kind: str) -> int:
        """The current value of a /wait counter."""
        return len(self.requests) if kind == "requests" else self.accepted

    def notify(self) -> None:
        """Release the /wait requests whose counter has been reached."""
        if not self.waiters:
            return
        keep = []
        for kind, target, fut in self.waiters:
            if fut.done():
                continue
            if self.counter(kind) >= target:
                fut.set_result(None)
            else:
                keep.append((kind, target, fut))
        self.waiters = keep

    def reset(self) -> None:
        """Forget everything recorded (pending waiters stay)."""
        self.requests.clear()
        self.callbacks.clear()
        self.callback_errors.clear()
        self.accepted = 0


class CallbackClient:
    """Posts callbacks over a small pool of kept-alive connections."""

    def __init__(self, recorder: Recorder, pool_size: int) -> None:
        self.recorder = recorder
        self._slots = asyncio.Semaphore(pool_size)
        self._idle: dict[tuple[str, int], list[Connection]] = {}

    async def post(self, url: str, body: bytes, node_id: str, attempt: int) -> None:
        """POST `body` to `url` and record when it was sent and answered (a broken connection is retried)."""
        parts = urlsplit(url)
        host, port = parts.hostname or "127.0.0.1", parts.port or 80
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        request = (f"POST {target} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
                   f"Content-Length: {len(body)}\r\n\r\n").encode() + body
        async with self._slots:
            last_error = "no attempt made"
            for _ in range(CALLBACK_ATTEMPTS):
                conn = self._take(host, port)
                try:
                    if conn is None:
                        conn = await asyncio.open_connection(host, port)
                    sent = time.time_ns()
                    conn[1].write(request)
                    status, answer, keep = await asyncio.wait_for(_read_response(conn[0]), CALLBACK_TIMEOUT_S)
                except (OSError, asyncio.IncompleteReadError, TimeoutError, ValueError) as exc:
                    last_error = f"{type(exc).__name__}: {exc}"
                    if conn is not None:
                        conn[1].close()
                    await asyncio.sleep(CALLBACK_RETRY_S)
                    continue
                answered = time.time_ns()
                if keep:
                    self._idle.setdefault((host, port), []).append(conn)
                else:
                    conn[1].close()
                accepted = status == 200 and b'"accepted":true' in answer
                self.recorder.callbacks.append((node_id, attempt, sent, answered, status, accepted))
                if accepted:
                    self.recorder.accepted += 1
                    self.recorder.notify()
                elif status != 200:
                    self.recorder.callback_errors.append(f"{node_id}: HTTP {status} {answer[:200]!r}")
                return
            self.recorder.callback_errors.append(f"{node_id}: gave up after {CALLBACK_ATTEMPTS} attempts: {last_error}")

    def _take(self, host: str, port: int) -> Connection | None:
        idle = self._idle.get((host, port))
        while idle:
            conn = idle.pop()
            if not conn[1].is_closing() and not conn[0].at_eof():
                return conn
            conn[1].close()
        return None


async def _read_headers(reader: asyncio.StreamReader) -> tuple[str, dict[str, str]]:
    """The first line and the (lower-cased) headers of an HTTP/1.1 message."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    return lines[0], headers


async def _read_body(reader: asyncio.StreamReader, headers: dict[str, str]) -> bytes:
    """A message body framed by Content-Length or chunked transfer coding."""
    if headers.get("transfer-encoding", "").lower() == "chunked":
        chunks: list[bytes] = []
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                await reader.readuntil(b"\r\n")
                return b"".join(chunks)
            chunks.append(await reader.readexactly(size))
            await reader.readexactly(2)
    length = int(headers.get("content-length", "0") or 0)
    return await reader.readexactly(length) if length else b""


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes, bool]:
    """(status, body, whether the connection may be reused) of one HTTP/1.1 response."""
    status_line, headers = await _read_headers(reader)
    status = int(status_line.split(" ", 2)[1])
    body = await _read_body(reader, headers)
    return status, body, headers.get("connection", "").lower() != "close"


def _response(status: str, body: bytes = b"", content_type: str = "application/json") -> bytes:
    return (f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n\r\n"
            .encode() + body)


ACCEPTED_202: Final = b"HTTP/1.1 202 Accepted\r\nContent-Length: 0\r\n\r\n"


class StepService:
    """The HTTP side: step paths, and the control routes the benchmark driver uses."""

    def __init__(self, pool_size: int) -> None:
        self.recorder = Recorder()
        self.client = CallbackClient(self.recorder, pool_size)
        self._tasks: set[asyncio.Task[None]] = set()
        self.gate_closed = False
        self._held: list[tuple[str, bytes, str, int]] = []  # callbacks waiting for the gate to open

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Serve one kept-alive connection until the peer closes it."""
        try:
            while True:
                request_line, headers = await _read_headers(reader)
                arrival = time.time_ns()
                body = await _read_body(reader, headers)
                method, target = request_line.split(" ", 2)[:2]
                path, _, query = target.partition("?")
                if path in ("/stats", "/wait", "/reset", "/gate"):
                    writer.write(await self._control(method, path, query))
                else:
                    writer.write(ACCEPTED_202)
                    self._step(path, headers, body, arrival)
                if headers.get("connection", "").lower() == "close":
                    break
                await writer.drain()
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError, IndexError):
            pass
        finally:
            writer.close()

    def _step(self, path: str, headers: dict[str, str], body: bytes, arrival: int) -> None:
        node_id = headers.get("aetr-node-id", "")
        attempt = int(headers.get("aetr-attempt", "0") or 0)
        self.recorder.requests.append((arrival, path, headers.get("aetr-run-id", ""), node_id, attempt))
        self.recorder.notify()
        callback = headers.get("aetr-callback")
        if path == "/hold" or not callback:
            return
        output = body if path == "/echo" and body else OK_BODY
        if self.gate_closed:
            self._held.append((callback, output, node_id, attempt))
        else:
            self._call_back(callback, output, node_id, attempt)

    def _call_back(self, callback: str, output: bytes, node_id: str, attempt: int) -> None:
        task = asyncio.create_task(self.client.post(callback, output, node_id, attempt))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _control(self, method: str, path: str, query: str) -> bytes:
        rec = self.recorder
        if path == "/reset" and method == "POST":
            rec.reset()
            return _response("200 OK", b'{"reset":true}')
        if path == "/gate" and method == "POST":
            self.gate_closed = parse_qs(query).get("closed", ["0"])[0] == "1"
            at, held = time.time_ns(), []
            if not self.gate_closed:
                held, self._held = self._held, []
                for args in held:
                    self._call_back(*args)
            return _response("200 OK", orjson.dumps({"released": len(held), "at": at}))
        if path == "/stats" and method == "GET":
            return _response("200 OK", orjson.dumps({
                "requests": rec.requests, "callbacks": rec.callbacks, "callback_errors": rec.callback_errors[:100],
                "n_callback_errors": len(rec.callback_errors), "accepted": rec.accepted}))
        if path == "/wait" and method == "GET":
            params = {k: v[0] for k, v in parse_qs(query).items()}
            timeout = min(float(params.get("timeout", "30")), MAX_WAIT_S)
            loop = asyncio.get_running_loop()
            futures = []
            for kind in ("requests", "accepted"):
                if kind in params and rec.counter(kind) < int(params[kind]):
                    fut: asyncio.Future[None] = loop.create_future()
                    rec.waiters.append((kind, int(params[kind]), fut))
                    futures.append(fut)
            done = True
            if futures:
                try:
                    await asyncio.wait_for(asyncio.gather(*futures), timeout)
                except TimeoutError:
                    done = False
            counts = orjson.dumps({"requests": len(rec.requests), "accepted": rec.accepted,
                                   "callback_errors": len(rec.callback_errors)})
            return _response("200 OK" if done else "408 Request Timeout", counts)
        return _response("404 Not Found", b'{"detail":"unknown control route"}')


async def serve(port: int, pool_size: int) -> None:
    """Listen on 127.0.0.1:`port` until cancelled."""
    service = StepService(pool_size)
    server = await asyncio.start_server(service.handle, "127.0.0.1", port, backlog=4096)
    print(f"stepsvc listening on 127.0.0.1:{port}", file=sys.stderr, flush=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    """Parse the command line and serve."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--pool", type=int, default=CALLBACK_POOL_SIZE, help="concurrent callback connections")
    args = parser.parse_args()
    try:
        import uvloop
    except ImportError:  # plain asyncio works too, only slower
        runner = asyncio.run
    else:
        runner = uvloop.run
    with contextlib.suppress(KeyboardInterrupt):
        runner(serve(args.port, args.pool))


if __name__ == "__main__":
    main()
