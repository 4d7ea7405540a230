"""What the API's routes share: the JSON answer, the engine served, the API token, and answering below FastAPI's
routing (the fast paths read their own body and answer their own errors).

The application (aetr.api.app) imports the routes, and the routes import this: imports point one way.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable
from typing import Any

import orjson
from fastapi import HTTPException, Request
from fastapi.responses import JSONResponse, Response
from starlette.types import Message, Receive, Scope, Send

from aetr.engine.outage import OUTAGE, is_outage
from aetr.engine.runtime import Engine
from aetr.engine.tokens import redact


class JSON(JSONResponse):
    """A JSON answer encoded by orjson (datetimes become ISO 8601 strings).

    A JSONResponse, so that the OpenAPI document gives routes a JSON body rather than a bare string.
    """

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


def engine_of(request: Request) -> Engine:
    """The Engine this application serves."""
    engine: Engine = request.app.state.engine
    return engine


async def require_token(request: Request) -> None:
    """With AETR_API_TOKEN set, every /api/v1 route but the callbacks needs `Authorization: Bearer <token>`.

    async: FastAPI runs a plain `def` dependency in a worker thread, a thread hop on every request.
    """
    if not token_ok(engine_of(request).settings.api_token, request.headers.get("authorization", "")):
        raise HTTPException(401, "missing or wrong API token: send `Authorization: Bearer <AETR_API_TOKEN>`",
                            headers={"WWW-Authenticate": "Bearer"})


def token_ok(expected: str | None, authorization: str) -> bool:
    """Whether an Authorization header value carries the API token (always, when none is set)."""
    if expected is None:
        return True
    scheme, _, token = authorization.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), expected.encode())


def unavailable_answer(method: str, path: str, cause: str) -> Response:
    """503 with Retry-After for a database outage (logged without any callback token)."""
    OUTAGE.failed(f"{method} {redact(path)}", cause, request=True)
    return JSON({"detail": "the database is unavailable or out of connections; try again shortly"},
                status_code=503, headers={"Retry-After": "1"})


async def read_body(receive: Receive) -> bytes | None:
    """A request's whole body from ASGI messages; None when the client went away first."""
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


async def answer_below_routing(scope: Scope, receive: Receive, send: Send, answer: Awaitable[Response]) -> None:
    """Send a fast route's answer as FastAPI would: its HTTPException as `{"detail"}`, an outage as 503."""
    response: Response
    try:
        response = await answer
    except HTTPException as exc:
        response = JSON({"detail": safe_text(exc.detail)}, status_code=exc.status_code, headers=exc.headers)
    except Exception as exc:
        if not is_outage(exc):
            raise
        response = unavailable_answer(scope["method"], scope["path"], type(exc).__name__)
    await response(scope, receive, send)


def replay(body: bytes, receive: Receive) -> Receive:
    """A receive that hands over a body already read, then goes on to the connection's own."""
    sent = False

    async def again() -> Message:
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return again


def safe_text(detail: Any) -> Any:
    """Text that orjson can encode: a lone surrogate (from a request or a script) is written as its escape."""
    if isinstance(detail, str):
        return detail.encode("utf-8", "backslashreplace").decode()
    return detail
