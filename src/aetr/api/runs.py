"""Routes for runs."""

from __future__ import annotations

import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Body, Header, HTTPException, Path, Query, Request, Response
from pydantic import ValidationError
from starlette.types import ASGIApp, Receive, Scope, Send
from yarl import URL

from aetr.api.answers import EventOut, PurgeOut, RunPage, RunTreeOut, errors
from aetr.api.http import JSON, answer_below_routing, engine_of, read_body, replay, token_ok
from aetr.api.render import nest, node_json, run_tree_json
from aetr.api.schemas import ID_PREFIX_PATTERN, PATTERN_HINTS, PurgeIn, RunIn, SignalIn, StepRef
from aetr.domain import ids
from aetr.domain.decide import Verdict
from aetr.domain.runs import TERMINAL
from aetr.engine import metrics
from aetr.engine.admission import StartsFull
from aetr.engine.retention import purge
from aetr.engine.runtime import Engine
from aetr.store.store import CURSOR_PATTERN

router = APIRouter(tags=["runs"])

MAX_WAIT_S = 60.0
START_RETRY_AFTER_S = 1  # seconds a start refused for a full queue is told to wait (Retry-After)
START_REFUSED = ("the database is unreachable, or more starts wait for a place than AETR_MAX_PENDING_STARTS allows; "
                 "nothing was started: try again after `Retry-After` seconds")
RunId = Annotated[str, Path(description="the run's id, or any node id of the run")]
# Where a client can go from a run it was given.
RUN_LINKS = {
    "GetRun": {"operationId": "get_run", "parameters": {"run_id": "$response.body#/id"}},
    "CancelRun": {"operationId": "cancel_run", "parameters": {"run_id": "$response.body#/id"}},
    "RetryRun": {"operationId": "retry_run", "parameters": {"run_id": "$response.body#/id"}},
    "RunEvents": {"operationId": "run_events", "parameters": {"run_id": "$response.body#/id"}},
}
LOCATION = {"Location": {"description": "the run's URL", "schema": {"type": "string"}}}


def _uuid(value: str) -> str:
    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise HTTPException(404, f"no run with id '{value}': ids are UUIDs") from None


async def _view(engine: Engine, run_id: str) -> dict[str, Any]:
    """The run as the API shows it, nested (404 when unknown)."""
    flat = await engine.store.get_run_view(_uuid(run_id))
    if not flat:
        raise HTTPException(404, f"no run with id '{run_id}'")
    return nest(flat)


@router.post("/runs", status_code=201, responses={
    201: {"model": RunTreeOut, "description": "the run, started", "headers": LOCATION, "links": RUN_LINKS},
    200: {"model": RunTreeOut, "description": "an earlier run with this Idempotency-Key", "links": RUN_LINKS},
    **errors(400, 415), 503: {**errors(503)[503], "description": START_REFUSED}})
async def start_run(
    request: Request,
    body: Annotated[RunIn, Body()],
    idempotency_key: Annotated[str | None, Header(max_length=200)] = None,
) -> Response:
    """Start a run of a step tree with an input; the tree is frozen into the run."""
    return await _start(engine_of(request), body, idempotency_key, request.headers.get("traceparent"))


async def _start(engine: Engine, body: RunIn, idempotency_key: str | None,
                 traceparent: str | None = None) -> Response:
    allowed = engine.settings.allowed_step_hosts
    if body.notify is not None and allowed is not None and (
            problem := allowed.url_host_problem(URL(body.notify).raw_host or "")):
        raise HTTPException(422, f"notify: {problem}: notifications go only to hosts steps may call; use a host "
                                 "it allows, or have the server's operator add this one")
    try:
        async with engine.starts.place():
            return await _started(engine, body, idempotency_key, traceparent)
    except StartsFull:
        raise HTTPException(503, f"too many runs are being started at once (AETR_MAX_PENDING_STARTS="
                                 f"{engine.settings.max_pending_starts} wait already); nothing was started: try "
                                 f"again in {START_RETRY_AFTER_S} s",
                            headers={"Retry-After": str(START_RETRY_AFTER_S)}) from None


async def _started(engine: Engine, body: RunIn, idempotency_key: str | None, traceparent: str | None) -> Response:
    """Start the run, holding a place at the gate: the answer is built before the place is given back."""
    started = await engine.coordinator.start_run(body.step, body.input, idempotency_key, body.notify, traceparent)
    if started.refused:
        raise HTTPException(422, f"step: {started.refused}")
    if not started.run_id:
        raise HTTPException(422, f"step: no step named (or with id) '{body.step}'; create it with PUT /api/v1/steps")
    if started.plan is None:  # an earlier run with this key
        return JSON(await _view(engine, started.run_id), status_code=200)
    # The run as its start committed it, with no read back.
    return JSON(run_tree_json(list(started.plan.nodes.values())), status_code=201,
                headers={"Location": f"/api/v1/runs/{started.run_id}"})


@router.get("/runs/{run_id}", responses={
    200: {"model": RunTreeOut, "links": {k: v for k, v in RUN_LINKS.items() if k != "GetRun"}}, **errors(404)})
async def get_run(
    request: Request, run_id: RunId,
    wait: Annotated[float | None, Query(ge=0, le=MAX_WAIT_S, description="seconds to wait for the run to end")] = None,
) -> Response:
    """The whole run tree, loaded in one query; `?wait=N` answers once the run ends or N seconds pass."""
    engine = engine_of(request)
    node_id = _uuid(run_id)
    if wait:
        # Only the root's state is read while waiting (a wide run changes at every child's commit), and
        # the whole tree once at the end.
        found = await engine.store.get_run_state(node_id)
        if found is None:
            raise HTTPException(404, f"no run with id '{run_id}'")
        root_id, state = found
        deadline = time.monotonic() + wait
        with engine.watching(root_id) as changed:
            if state not in TERMINAL:  # it may have ended before the watch began
                state = (await engine.store.get_run_state(root_id) or (root_id, state))[1]
            while state not in TERMINAL and (left := deadline - time.monotonic()) > 0:
                # Woken by this process's commits at once; re-read at least every poll interval so a run
                # advanced by another process sharing the database is seen too.
                await changed.changed(min(left, engine.settings.poll_s))
                state = (await engine.store.get_run_state(root_id) or (root_id, state))[1]
    body = await engine.store.get_run_json(node_id)
    if body is None:
        raise HTTPException(404, f"no run with id '{run_id}'")
    return Response(body, media_type="application/json")


@router.get("/runs", responses={200: {"model": RunPage}})
async def list_runs(
    request: Request,
    state: Literal["pending", "executing", "complete", "error", "cancelled"] | None = None,
    step: Annotated[StepRef | None, Query(description="only runs of the step with this name")] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    cursor: Annotated[str | None, Query(
        pattern=CURSOR_PATTERN, description="where the page starts: the `next_cursor` of the page before (the "
                                            "creation time, in microseconds since 1970, and the id of the last run "
                                            "shown; runs older than it come next)")] = None,
    id_prefix: Annotated[str | None, Query(
        max_length=ids.ID_CHARS, pattern=ID_PREFIX_PATTERN,
        description="only runs whose id starts with this: 4 to 32 of its hex digits, hyphens optional; "
                    "the page is then ordered by id, newest first")] = None,
) -> Response:
    """Root runs, newest first: `{runs: [...], next_cursor}`."""
    prefix = None
    if id_prefix is not None:
        prefix = ids.normal_prefix(id_prefix)
        if prefix is None:  # the pattern lets none through: kept for a pattern changed without this
            raise HTTPException(422, f"query.id_prefix: {PATTERN_HINTS[ID_PREFIX_PATTERN]}")
    try:
        page = await engine_of(request).store.list_runs(state, step, limit, cursor, prefix)
    except ValueError as exc:
        raise HTTPException(422, f"cursor: {exc}") from None
    return JSON({"runs": [node_json(n) for n in page.runs], "next_cursor": page.next_cursor})


@router.post("/runs/{run_id}/cancel", responses={200: {"model": RunTreeOut}, **errors(404, 409)})
async def cancel_run(request: Request, run_id: RunId) -> Response:
    """Every unfinished node of the run becomes cancelled."""
    return await _act(request, run_id, "cancel", lambda engine, root_id: engine.coordinator.cancel(root_id))


@router.post("/runs/{run_id}/retry", responses={200: {"model": RunTreeOut}, **errors(404, 409)})
async def retry_run(request: Request, run_id: RunId) -> Response:
    """A run in error or cancelled goes on: failed and cancelled nodes run again, complete ones are kept."""
    return await _act(request, run_id, "retry", lambda engine, root_id: engine.coordinator.redrive(root_id))


async def _act(request: Request, run_id: str, verb: str,
               action: Callable[[Engine, str], Awaitable[Verdict]]) -> Response:
    """Apply an action to a whole run: the run tree afterwards, or 409 saying why it was refused."""
    engine = engine_of(request)
    verdict = await action(engine, (await _view(engine, run_id))["root_id"])
    if verdict.outcome != "accepted":
        raise HTTPException(409, f"cannot {verb}: {verdict.reason}")
    return JSON(await _view(engine, run_id))


@router.delete("/runs/{run_id}", status_code=204, response_class=Response, responses=errors(404, 409))
async def delete_run(request: Request, run_id: RunId) -> Response:
    """Delete an ended run with its nodes and history (its end notification too, if still being delivered);
    409 while it has not ended (cancel it first), then 404."""
    engine = engine_of(request)
    root_id = await engine.store.root_of(_uuid(run_id))
    outcome = "unknown" if root_id is None else await engine.store.retention.delete_run(root_id)
    if outcome == "unknown":
        raise HTTPException(404, f"no run with id '{run_id}'")
    if outcome == "running":
        raise HTTPException(409, f"cannot delete run '{run_id}': it has not ended; cancel it first")
    metrics.RUNS_DELETED.labels("api").inc()
    return Response(status_code=204)


@router.post("/retention/purge", responses={200: {"model": PurgeOut}, **errors(400, 415)})
async def purge_runs(request: Request, body: Annotated[PurgeIn, Body()]) -> Response:
    """Delete every run that ended more than `older_than_s` seconds ago, in small batches beside running work:
    `{deleted: N}`. A run whose end notification is still being delivered is kept until that is done."""
    engine = engine_of(request)
    ended_before = datetime.now(UTC) - timedelta(seconds=body.older_than_s)
    return JSON({"deleted": await purge(engine.store, ended_before, "purge")})


@router.post("/runs/{run_id}/nodes/{node_id}/signal", responses={200: {"model": RunTreeOut},
                                                                  **errors(400, 404, 409, 415)})
async def signal_node(request: Request, run_id: RunId, node_id: Annotated[str, Path(description="the wait's node id")],
                      body: Annotated[SignalIn, Body()]) -> Response:
    """Answer a signal wait: with `output` it completes with that output, with `error` it fails (kind `signal`).
    The run tree afterwards; 409 when the node is not a wait awaiting its signal."""
    engine = engine_of(request)
    root_id = await engine.store.root_of(_uuid(node_id))
    if root_id is None or root_id != await engine.store.root_of(_uuid(run_id)):
        raise HTTPException(404, f"run '{run_id}' has no node '{node_id}'")
    verdict = await engine.coordinator.signal(str(uuid.UUID(node_id)), body.output, body.error)
    if verdict.outcome == "unknown":
        raise HTTPException(404, f"run '{run_id}' has no node '{node_id}'")
    if verdict.outcome != "accepted":
        raise HTTPException(409, f"cannot signal node '{node_id}': {verdict.reason}")
    return JSON(await _view(engine, run_id))


@router.get("/runs/{run_id}/events", responses={200: {"model": list[EventOut]}, **errors(404)})
async def run_events(request: Request, run_id: RunId) -> Response:
    """The run's history, oldest first."""
    engine = engine_of(request)
    root_id = await engine.store.root_of(_uuid(run_id))
    if root_id is None:
        raise HTTPException(404, f"no run with id '{run_id}'")
    return JSON(await engine.store.run_events(root_id))


START_PATH = "/api/v1/runs"


class FastStarts:
    """Serves the plain case of `POST /api/v1/runs` below FastAPI's routing and dependencies, as FastCallbacks
    does the callbacks: a JSON body `RunIn` accepts, no Idempotency-Key, the API token right (or none set).

    Its answers are the route's own (`_start`). Any other request, including every one the route would
    refuse, goes on to FastAPI with its body as read, so that refusals keep their single wording.
    """

    def __init__(self, app: ASGIApp, engine: Callable[[], Engine]) -> None:
        self.app = app
        self.engine = engine

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (scope["type"] != "http" or scope["method"] != "POST" or scope["path"] != START_PATH
                or scope.get("root_path")):
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        engine = self.engine()
        body = await read_body(receive)
        if body is None:
            return
        run_in = None
        if (b"idempotency-key" not in headers and b"json" in headers.get(b"content-type", b"")
                and token_ok(engine.settings.api_token, headers.get(b"authorization", b"").decode("latin-1"))):
            try:
                run_in = RunIn.model_validate_json(body)
            except ValidationError:
                run_in = None
        if run_in is None:
            await self.app(scope, replay(body, receive), send)
            return
        parent = headers.get(b"traceparent")
        await answer_below_routing(scope, receive, send,
                                   _start(engine, run_in, None, parent.decode("latin-1") if parent else None))
