"""The HTTP application: routers, authentication, the payload limit and error answers."""

from __future__ import annotations

import hmac
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import orjson
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from aetr.config import Settings
from aetr.engine.runtime import Engine

log = logging.getLogger("aetr.api")


class JSON(Response):
    """A JSON answer encoded by orjson (datetimes become ISO 8601 strings)."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


def engine_of(request: Request) -> Engine:
    """The Engine this application serves."""
    engine: Engine = request.app.state.engine
    return engine


def require_token(request: Request) -> None:
    """With AETR_API_TOKEN set, every /api/v1 route but the callbacks needs `Authorization: Bearer <token>`."""
    expected = engine_of(request).settings.api_token
    if expected is None:
        return
    given = request.headers.get("authorization", "")
    scheme, _, token = given.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), expected.encode()):
        raise HTTPException(401, "missing or wrong API token: send `Authorization: Bearer <AETR_API_TOKEN>`",
                            headers={"WWW-Authenticate": "Bearer"})


class PayloadLimit:
    """Answers 413 to any request body over the limit, before a route reads it, counting streamed bodies too."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            await self._refuse(send)
            return
        seen = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _TooLarge
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except _TooLarge:
            if not started:
                await self._refuse(send)

    async def _refuse(self, send: Send) -> None:
        body = orjson.dumps({"detail": f"request body is larger than {self.limit} bytes "
                                       "(AETR_MAX_PAYLOAD_BYTES); nothing was changed"})
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


class _TooLarge(Exception):
    pass


def describe_validation(exc: RequestValidationError) -> str:
    """One readable sentence per problem: where it is and what is wrong."""
    parts = []
    for err in exc.errors():
        loc = [str(p) for p in err.get("loc", ()) if p not in ("body",)]
        # Discriminated unions put the kind in the path ("api", "sequential"): keep it, it says which shape.
        where = ".".join(loc) or "body"
        msg = err.get("msg", "invalid")
        if err.get("type") == "json_invalid":
            where, msg = "body", "is not valid JSON: " + str(err.get("ctx", {}).get("error", msg))
        elif err.get("type") == "extra_forbidden":
            msg = "is not a known field: remove it"
        elif err.get("type") == "missing":
            msg = "is required"
        parts.append(f"{where}: {msg}")
    return "; ".join(parts) or "the request is not valid"


def create_app(settings: Settings | None = None, engine: Engine | None = None) -> FastAPI:
    """The ASGI application for these settings (or for an engine a test built)."""
    from aetr.api import callbacks, runs, sandbox, steps

    settings = settings or (engine.settings if engine else Settings.from_env())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        eng = engine or Engine(settings)
        await eng.start()
        app.state.engine = eng
        try:
            yield
        finally:
            await eng.stop()

    app = FastAPI(title="AETR", version="0.1.0", lifespan=lifespan, default_response_class=JSON,
                  description="Compose HTTP services into durable step trees.")

    @app.exception_handler(RequestValidationError)
    async def on_validation(_: Request, exc: RequestValidationError) -> Response:
        return JSON({"detail": describe_validation(exc)}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def on_http(_: Request, exc: StarletteHTTPException) -> Response:
        return JSON({"detail": exc.detail}, status_code=exc.status_code, headers=getattr(exc, "headers", None))

    auth = [Depends(require_token)]
    app.include_router(steps.router, prefix="/api/v1", dependencies=auth)
    app.include_router(runs.router, prefix="/api/v1", dependencies=auth)
    app.include_router(sandbox.router, prefix="/api/v1", dependencies=auth)
    app.include_router(callbacks.router, prefix="/api/v1")

    @app.get("/healthz", tags=["operations"])
    async def healthz(request: Request) -> Response:
        """200 when the database answers."""
        try:
            async with engine_of(request).store.engine.connect() as conn:
                await conn.execute(text("SELECT 1"))
        except Exception as exc:  # any database failure means "not healthy", never a 500
            return JSON({"status": "unavailable", "detail": f"database unreachable: {type(exc).__name__}"},
                        status_code=503)
        return JSON({"status": "ok"})

    @app.get("/metrics", tags=["operations"], response_class=Response)
    async def metrics() -> Response:
        """Prometheus metrics."""
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    app.add_middleware(PayloadLimit, limit=settings.max_payload_bytes)
    return app
