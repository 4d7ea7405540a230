"""The floor: an in-memory stand-in for `aetr serve`, driven by the same benchmark (`benchmarks/run --standin`).

It keeps nothing but a dict: no database, no decide step, no history, no sandbox. It answers the routes the
`chain` and `throughput` scenarios use (PUT a sequence of inline api steps, POST /runs, the success callback,
GET /runs?step=&state= to count runs) and calls each step as AETR does: the same server stack (uvicorn with
uvloop and httptools, below any framework, as AETR's callback route), the same client (one aiohttp session),
the callback URL in the query and the AETR-* headers. What it reaches on this machine is what the step
service's, the driver's and the two HTTP exchanges' CPU leave for any engine; AETR's numbers are read against
it (docs/performance.md).

    python -m benchmarks.standin serve --port 9999
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, quote

import aiohttp
import orjson
import uvicorn

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


@dataclass
class Run:
    step: str
    urls: list[str]
    value: Any
    position: int = 0
    state: str = "executing"
    ended: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass
class StandIn:
    base: str
    steps: dict[str, list[str]] = field(default_factory=dict)  # sequence name -> its children's URLs
    runs: dict[str, Run] = field(default_factory=dict)
    ids: itertools.count[int] = field(default_factory=itertools.count)
    session: aiohttp.ClientSession | None = None
    tasks: set[asyncio.Task[None]] = field(default_factory=set)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while (message := await receive())["type"] != "lifespan.shutdown":
                if message["type"] == "lifespan.startup":
                    self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=256))
                    await send({"type": "lifespan.startup.complete"})
            if self.session is not None:
                await self.session.close()
            await send({"type": "lifespan.shutdown.complete"})
            return
        method, path = scope["method"], scope["path"]
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        if path.startswith("/api/v1/callbacks/") and method == "POST":
            await self.callback(path.rsplit("/", 1)[1], orjson.loads(body) if body else None)
            return await answer(send, 200, {"accepted": True, "outcome": "accepted"})
        if path == "/api/v1/runs" and method == "POST":
            asked = orjson.loads(body)
            run_id = f"run-{next(self.ids)}"
            self.runs[run_id] = Run(asked["step"], self.steps[asked["step"]], asked.get("input"))
            self.dispatch(run_id)
            return await answer(send, 201, {"id": run_id, "state": "executing"})
        if path.startswith("/api/v1/steps/") and method == "PUT":
            tree = orjson.loads(body)
            self.steps[tree["name"]] = [child["step"]["url"] for child in tree["children"]]
            return await answer(send, 201, {"name": tree["name"]})
        if path == "/api/v1/runs" and method == "GET":
            query = {k: v[0] for k, v in parse_qs(scope["query_string"].decode()).items()}
            found = [{"id": i} for i, r in self.runs.items() if r.step == query["step"] and r.state == query["state"]]
            return await answer(send, 200, {"runs": found, "next_cursor": None})
        if path.startswith("/api/v1/runs/") and method == "GET":
            run = self.runs[path.rsplit("/", 1)[1]]
            wait = float(parse_qs(scope["query_string"].decode()).get("wait", ["0"])[0])
            if wait > 0 and run.state == "executing":
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(run.ended.wait(), wait)
            return await answer(send, 200, {"id": path.rsplit("/", 1)[1], "state": run.state, "output": run.value})
        if path == "/healthz":
            return await answer(send, 200, {"status": "ok"})
        return await answer(send, 404, {"detail": "the stand-in has no such route"})

    async def callback(self, token: str, output: Any) -> None:
        run_id, _, position = token.rpartition(".")
        run = self.runs[run_id]
        if run.state != "executing" or run.position != int(position):
            return
        run.value = output
        run.position += 1
        if run.position == len(run.urls):
            run.state = "complete"
            run.ended.set()
        else:
            self.dispatch(run_id)

    def dispatch(self, run_id: str) -> None:
        task = asyncio.get_running_loop().create_task(self.call(run_id))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def call(self, run_id: str) -> None:
        run = self.runs[run_id]
        callback = f"{self.base}/api/v1/callbacks/{run_id}.{run.position}"
        url = f"{run.urls[run.position]}?aetr={quote(callback, safe='')}"
        headers = {"Content-Type": "application/json", "AETR-Callback": callback, "AETR-Run-Id": run_id,
                   "AETR-Node-Id": f"{run_id}.{run.position}", "AETR-Attempt": "1"}
        assert self.session is not None
        async with self.session.post(url, data=orjson.dumps(run.value), headers=headers) as resp:
            await resp.read()


async def answer(send: Send, status: int, body: Any) -> None:
    raw = orjson.dumps(body)
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())]})
    await send({"type": "http.response.body", "body": raw})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("serve", nargs="?", help="ignored: accepted so that it starts as `aetr serve` does")
    parser.add_argument("--port", type=int, default=9999)
    args = parser.parse_args()
    app = StandIn(base=f"http://127.0.0.1:{args.port}")
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
