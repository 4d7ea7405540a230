"""Callback routes: authenticated by their signed token alone."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Annotated

import orjson
from fastapi import APIRouter, HTTPException, Path, Request, Response
from pydantic import ValidationError
from starlette.types import ASGIApp, Receive, Scope, Send

from aetr.api.answers import CallbackAnswer, errors
from aetr.api.http import JSON, answer_below_routing, engine_of, read_body
from aetr.api.schemas import FailIn
from aetr.domain.decide import Verdict
from aetr.engine.dispatcher import parse_body
from aetr.engine.runtime import Engine
from aetr.engine.tokens import Attempt

router = APIRouter(tags=["callbacks"])
Token = Annotated[str, Path(max_length=200)]

# The routes read their bodies themselves (any JSON, or text, is an output); these describe them for the document.
OUTPUT_BODY = {"requestBody": {"required": False, "content": {
    "application/json": {"schema": {"description": "the step's output, stored as JSON"}},
    "text/plain": {"schema": {"type": "string", "description": "the step's output, stored as a string"}}}}}
FAILURE_BODY = {"requestBody": {"required": True,
                                "content": {"application/json": {"schema": FailIn.model_json_schema()}}}}


def _attempt(request: Request, token: str) -> Attempt:
    return _verify(engine_of(request), token)


def _verify(engine: Engine, token: str) -> Attempt:
    assert engine.signer is not None
    attempt = engine.signer.verify(token)
    if attempt is None:
        raise HTTPException(404, "unknown callback token")
    return attempt


# The answer to nearly every callback, rendered once: sending a Response changes nothing in it.
ACCEPTED = JSON({"accepted": True})


def _answer(verdict: Verdict) -> Response:
    if verdict.outcome == "accepted":
        return ACCEPTED
    if verdict.outcome == "duplicate":
        return JSON({"accepted": False, "duplicate": True})
    if verdict.outcome == "unknown":
        raise HTTPException(404, "unknown callback token")
    raise HTTPException(409, f"callback refused: {verdict.reason}")


@router.post("/callbacks/{token}", responses={200: {"model": CallbackAnswer}, **errors(400, 409)},
             openapi_extra=OUTPUT_BODY)
async def callback_success(request: Request, token: Token) -> Response:
    """The step succeeded; the body is its output (JSON is stored as JSON, anything else as a string)."""
    return await report_success(engine_of(request), token, await request.body(), request.headers.get("content-type"))


async def report_success(engine: Engine, token: str, body: bytes, content_type: str | None) -> Response:
    """A step's success callback, whichever way it came in (the route, or FastCallbacks)."""
    began = time.monotonic()
    attempt = _verify(engine, token)
    try:
        output = parse_body(body, content_type)
    except orjson.JSONDecodeError as exc:
        raise HTTPException(400, f"body says it is JSON but is not valid JSON: {exc}; nothing was changed") from None
    except ValueError as exc:  # JSON that AETR cannot store exactly
        raise HTTPException(422, f"output: {exc}; nothing was changed") from None
    verdict = await engine.coordinator.step_succeeded(attempt.node_id, attempt.attempt, output, source="callback")
    if engine.dispatcher is not None and engine.dispatcher.window is not None:
        engine.dispatcher.window.answered((attempt.node_id, attempt.attempt), time.monotonic() - began)
    return _answer(verdict)


SUCCESS_PREFIX = "/api/v1/callbacks/"
MAX_TOKEN = 200  # the route's own limit on the path segment


class FastCallbacks:
    """Serves `POST /api/v1/callbacks/{token}` below FastAPI's routing, dependencies and middleware stack.

    It is the hottest route (every step ends with one), and that machinery cost about 30 % of the process's
    CPU under load. The answers are the route's own (`report_success`); anything else, including the
    `/fail` and `/heartbeat` callbacks, goes on to FastAPI.
    """

    def __init__(self, app: ASGIApp, engine: Callable[[], Engine]) -> None:
        self.app = app
        self.engine = engine

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        token = self._token(scope)
        if token is None:
            await self.app(scope, receive, send)
            return
        body = await read_body(receive)
        if body is None:
            return
        content_type = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"content-type"), None)
        await answer_below_routing(scope, receive, send, report_success(self.engine(), token, body, content_type))

    @staticmethod
    def _token(scope: Scope) -> str | None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope.get("root_path"):
            return None
        path: str = scope["path"]
        if not path.startswith(SUCCESS_PREFIX):
            return None
        token = path[len(SUCCESS_PREFIX):]
        return token if 0 < len(token) <= MAX_TOKEN and "/" not in token else None


@router.post("/callbacks/{token}/fail", responses={200: {"model": CallbackAnswer}, **errors(409)},
             openapi_extra=FAILURE_BODY)
async def callback_fail(request: Request, token: Token) -> Response:
    """The step failed: `{"error": "...", "retryable": false}`."""
    attempt = _attempt(request, token)
    try:
        body = FailIn.model_validate_json(await request.body())
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in exc.errors())
        raise HTTPException(422, f'expected {{"error": "...", "retryable": false}}: {problems}') from None
    engine = engine_of(request)
    verdict = await engine.coordinator.attempt_failed(
        attempt.node_id, attempt.attempt, body.error, "callback", body.retryable, source="callback.fail")
    if engine.dispatcher is not None and engine.dispatcher.window is not None:
        engine.dispatcher.window.leave((attempt.node_id, attempt.attempt))
    return _answer(verdict)


@router.post("/callbacks/{token}/heartbeat", responses={200: {"model": CallbackAnswer}, **errors(409)})
async def callback_heartbeat(request: Request, token: Token) -> Response:
    """The step is alive: its `heartbeat_s` deadline starts again."""
    attempt = _attempt(request, token)
    return _answer(await engine_of(request).coordinator.heartbeat(attempt.node_id, attempt.attempt))
