"""The web UI's routes: the page at `/`, its files under `/ui/`, and a run's live stream (Server-Sent Events)."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Annotated

import orjson
from fastapi import APIRouter, Depends, HTTPException, Path, Request
from fastapi.responses import Response, StreamingResponse

from aetr.api.http import engine_of, require_token
from aetr.api.render import nest
from aetr.domain.runs import TERMINAL
from aetr.engine.outage import OUTAGE, is_outage
from aetr.engine.runtime import RunWatch
from aetr.ui import static_file

log = logging.getLogger("aetr.api.ui")

router = APIRouter(tags=["ui"])

KEEPALIVE_S = 15.0  # seconds: a comment line on a quiet stream, so proxies and browsers keep it open
STREAM_MAX_S = 600.0  # seconds one stream lasts; the page then reconnects (no connection is held forever)
# A run changes at every commit of one of its nodes, and each change re-reads the whole run: reads are spaced
# by at least REFRESH_MIN_S, and by REFRESH_COST_FACTOR times what the last one took (a 10,000-node run takes
# about 0.15 s to read), so one watcher of a wide run costs a bounded share of the process.
REFRESH_MIN_S = 0.1
REFRESH_COST_FACTOR = 4.0

# The page loads only its own files and talks only to this server: injected markup could not call out.
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; "
                               "form-action 'self'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def _file_response(request: Request, path: str) -> Response:
    found = static_file(path)
    if found is None:
        raise HTTPException(404, f"no UI file '{path}'")
    content, media_type = found
    etag = '"' + hashlib.sha256(content).hexdigest()[:32] + '"'
    headers = {**PAGE_HEADERS, "ETag": etag}
    if request.headers.get("if-none-match") == etag:
        return Response(status_code=304, headers=headers)
    return Response(content, media_type=media_type, headers=headers)


@router.get("/", include_in_schema=False)
async def index(request: Request) -> Response:
    """The web UI's single page."""
    return _file_response(request, "index.html")


@router.get("/ui/{path:path}", include_in_schema=False)
async def ui_file(request: Request, path: str) -> Response:
    """One of the UI's static files (scripts, styles, icons)."""
    return _file_response(request, path)


def _message(event: str, data: bytes) -> bytes:
    """One Server-Sent Events message; orjson never writes a line break, so `data` is a single line."""
    return b"event: " + event.encode() + b"\ndata: " + data + b"\n\n"


# Not in the OpenAPI document: a stream stays open while its run goes on, which a schema-driven client
# (or fuzzer) cannot use; docs/ui.md describes it.
@router.get("/api/v1/runs/{run_id}/stream", include_in_schema=False, dependencies=[Depends(require_token)])
async def stream_run(
    request: Request,
    run_id: Annotated[str, Path(description="the run's id, or any node id of the run")],
) -> Response:
    """`event: run` with the whole run tree now and after every change; `event: end` once the run is over."""
    engine = engine_of(request)
    try:
        key = str(uuid.UUID(run_id))
    except ValueError:
        raise HTTPException(404, f"no run with id '{run_id}': ids are UUIDs") from None
    first = await engine.store.get_run_view(key)
    if not first:
        raise HTTPException(404, f"no run with id '{run_id}'")
    root_id = first[0]["root_id"]
    poll_s = engine.settings.poll_s

    async def messages() -> AsyncIterator[bytes]:
        with engine.watching(root_id) as watch:
            async for message in _stream(watch):
                yield message

    async def _stream(watch: RunWatch) -> AsyncIterator[bytes]:
        tree = nest(first)
        watch.event.set()  # the first read came before the watch: read once more after it
        sent = b""
        started = last_write = read_at = time.monotonic()
        read_s = 0.0
        while True:
            body = orjson.dumps(tree)
            now = time.monotonic()
            if body != sent:
                yield _message("run", body)
                sent, last_write = body, now
            elif now - last_write >= KEEPALIVE_S:
                yield b": keep-alive\n\n"
                last_write = now
            state = tree["state"]
            if state in TERMINAL:
                yield _message("end", orjson.dumps({"state": state}))
                return
            if now - started >= STREAM_MAX_S or await request.is_disconnected():
                return
            # Woken at once by this process's commits; every poll_s anyway, for changes made by another process.
            await watch.changed(poll_s)
            if (pause := read_at + max(REFRESH_MIN_S, REFRESH_COST_FACTOR * read_s) - time.monotonic()) > 0:
                await asyncio.sleep(pause)  # a rate limit: the changes made meanwhile are in the next read
            read_at = time.monotonic()
            try:
                tree = nest(await engine.store.get_run_view(root_id))
                read_s = time.monotonic() - read_at
            except Exception as exc:  # the database went away: end this stream, the page reconnects
                if is_outage(exc):
                    OUTAGE.failed(f"the live view of run {root_id}", str(exc), request=True)
                else:
                    log.warning("run stream %s: cannot load the run; closing the stream", root_id, exc_info=True)
                yield _message("error", orjson.dumps({"detail": "the server could not load the run; reconnecting"}))
                return

    return StreamingResponse(messages(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
