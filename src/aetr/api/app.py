"""The HTTP application: routers, authentication, the payload limit and error answers."""

from __future__ import annotations

import inspect
import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, Final

import orjson
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from fastapi.routing import APIRoute
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match
from starlette.types import ASGIApp, Receive, Scope, Send

from aetr.api import callbacks, runs, sandbox, schedules, steps, ui
from aetr.api.answers import API_ERRORS, CALLBACK_ERRORS, Health, errors
from aetr.api.http import JSON, engine_of, replay, require_token, safe_text, unavailable_answer
from aetr.api.schemas import PATTERN_HINTS
from aetr.config import Settings
from aetr.domain.jsonvalue import MAX_JSON_DEPTH
from aetr.engine import metrics as engine_metrics
from aetr.engine.outage import OUTAGE, is_outage
from aetr.engine.runtime import Engine
from aetr.store import Unavailable


class PayloadLimit:
    """Answers 413 to any request body over the limit, before any route sees the request.

    A body with a Content-Length is refused by its header alone: the server never hands a route more than
    that. A chunked body, whose length is known only at its end, is read here to its end (up to the limit)
    before the route runs: a route that does not read its body (cancel, retry, heartbeat) must not act on a
    request it should refuse.
    """

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = chunked = None
        for name, value in scope["headers"]:
            if name == b"content-length":
                length = value
            elif name == b"transfer-encoding":
                chunked = value
        if length is not None and length.isdigit() and int(length) > self.limit:
            await self._refuse(send)
            return
        if chunked is None:
            await self.app(scope, receive, send)
            return
        chunks = []
        seen = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            seen += len(chunk)
            if seen > self.limit:
                # The server discards the rest of the body as it arrives, within its body time limit.
                await self._refuse(send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        await self.app(scope, replay(b"".join(chunks), receive), send)

    async def _refuse(self, send: Send) -> None:
        body = orjson.dumps({"detail": f"request body is larger than {self.limit} bytes "
                                       "(AETR_MAX_PAYLOAD_BYTES); nothing was changed"})
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


def describe_validation(exc: RequestValidationError) -> str:
    """One readable sentence per problem: where it is and what is wrong."""
    parts = []
    for err in exc.errors():
        # Field names may be the client's own dict keys: cut them short.
        loc = [_shorten(str(p)) for p in err.get("loc", ()) if p not in ("body",)]
        # Discriminated unions put the kind in the path ("api", "sequential"): keep it, it says which shape.
        where = ".".join(loc) or "body"
        msg = err.get("msg", "invalid")
        kind = err.get("type")
        ctx = err.get("ctx", {})
        if kind == "json_invalid":
            where, msg = "body", "is not valid JSON: " + str(ctx.get("error", msg))
        elif kind == "extra_forbidden":
            msg = "is not a known field: remove it"
        elif kind == "missing":
            msg = "is required"
        elif kind in ("model_attributes_type", "model_type", "dict_type"):
            msg = "must be a JSON object ({...})"
        elif kind == "string_pattern_mismatch":
            msg = PATTERN_HINTS.get(str(ctx.get("pattern")), msg)
        elif kind == "value_error" and "error" in ctx:
            msg = str(ctx["error"])
        parts.append(f"{where}: {msg}")
    return "; ".join(parts) or "the request is not valid"


METHODS: Final = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")


def allowed_methods(request: Request) -> str:
    """The `Allow` value for the request's path: every method some route serves on it, then OPTIONS."""
    routes = request.app.router.routes
    served = [method for method in METHODS
              if any(route.matches({**request.scope, "method": method})[0] is Match.FULL for route in routes)]
    return ", ".join([*served, "OPTIONS"])


def operation_id(route: APIRoute) -> str:
    """A route's operationId: its function's name (`start_run`), which OpenAPI links refer to."""
    return route.name


def _shorten(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def _is_json(content_type: str | None) -> bool:
    """Whether a Content-Type names JSON (application/json or application/*+json), as FastAPI decides it."""
    media = (content_type or "").partition(";")[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


def _telemetry() -> dict[str, Any]:
    """FastAPI's OpenTelemetry support stays on when the environment configures OpenTelemetry (an OTEL_* or
    FASTAPI_OTEL_* variable). Otherwise it is switched off: it looks its providers up in os.environ on every
    request, 4 % of the process's CPU under load, to find none."""
    if "telemetry" not in inspect.signature(FastAPI.__init__).parameters:
        return {}  # a FastAPI without it
    if any(name.startswith(("OTEL_", "FASTAPI_OTEL_")) for name in os.environ):
        return {}
    return {"telemetry": {"tracing": False, "metrics": False, "logs": False, "operation_spans": False}}


class AetrApp(FastAPI):
    """FastAPI, with the requests every step makes (its success callback, a plain start) answered in front of
    FastAPI's own middleware stack.

    The fast paths (FastCallbacks, FastStarts) answer below the routing already; in front of the stack, they
    also skip its four layers of middleware (server errors, exception telemetry, body limits, exceptions) and
    their wrapped `send`. The body limit stays first for every request (PayloadLimit). An error the fast paths
    do not answer themselves reaches uvicorn, which logs it and answers 500, as the stack would.
    """

    front: ASGIApp | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.front is None:
            await super().__call__(scope, receive, send)
        else:
            await self.front(scope, receive, send)

    def put_in_front(self, settings: Settings) -> None:
        """Answer the fast paths before FastAPI's stack, every request after the body limit."""
        def engine() -> Engine:
            return engine_of_app(self)

        async def stack(scope: Scope, receive: Receive, send: Send) -> None:
            await FastAPI.__call__(self, scope, receive, send)

        self.front = PayloadLimit(callbacks.FastCallbacks(runs.FastStarts(stack, engine=engine), engine=engine),
                                  limit=settings.max_payload_bytes)


def create_app(settings: Settings | None = None, engine: Engine | None = None,
               on_started: Callable[[], None] | None = None) -> FastAPI:
    """The ASGI application for these settings (or for an engine a test built); `on_started` runs once the
    engine has started, before the first request."""
    settings = settings or (engine.settings if engine else Settings.from_env())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        eng = engine or Engine(settings)
        await eng.start()
        app.state.engine = eng
        if on_started is not None:
            on_started()
        try:
            yield
        finally:
            await eng.stop()

    app = AetrApp(title="AETR", version="0.1.0", lifespan=lifespan, default_response_class=JSON,
                  description="Compose HTTP services into durable step trees. The reference, with examples, is "
                              "docs/api.md in the repository.",
                  generate_unique_id_function=operation_id, **_telemetry())

    @app.exception_handler(RequestValidationError)
    async def on_validation(request: Request, exc: RequestValidationError) -> Response:
        content_type = request.headers.get("content-type")
        body_refused = any(err.get("loc", ())[:1] == ("body",) for err in exc.errors())
        # FastAPI only parses a body sent as JSON; any other body fails validation as a bare string.
        if body_refused and not _is_json(content_type) and await request.body():
            got = f"Content-Type: {content_type}" if content_type else "no Content-Type"
            return JSON({"detail": safe_text(f"the body must be JSON, sent with Content-Type: application/json "
                                         f"(this request has {_shorten(got)})")}, status_code=415)
        return JSON({"detail": safe_text(describe_validation(exc))}, status_code=422)

    def unavailable(request: Request, cause: str) -> Response:
        return unavailable_answer(request.method, request.url.path, cause)

    @app.exception_handler(DBAPIError)
    async def on_database(request: Request, exc: DBAPIError) -> Response:
        # The database refusing or dropping connections is an outage to wait out (503), not a bug (500).
        if is_outage(exc):
            return unavailable(request, type(exc.orig).__name__)
        raise exc

    @app.exception_handler(Unavailable)
    async def on_unavailable(request: Request, exc: Unavailable) -> Response:
        return unavailable(request, str(exc))

    @app.exception_handler(StarletteHTTPException)
    async def on_http(request: Request, exc: StarletteHTTPException) -> Response:
        detail = exc.detail
        path = _shorten(request.url.path, 300)
        cause = exc.__cause__
        # FastAPI answers 400 "There was an error parsing the body" to any failure but bad JSON syntax.
        if exc.status_code == 400 and isinstance(cause, RecursionError):
            detail = f"body: JSON nests too deeply to read; values may nest at most {MAX_JSON_DEPTH} levels"
        elif exc.status_code == 400 and isinstance(cause, UnicodeDecodeError):
            detail = f"body: is not valid JSON: it is not UTF-8 text ({cause.reason} at byte {cause.start})"
        elif exc.status_code == 404 and detail == "Not Found":  # Starlette's answer when no route matches
            detail = f"no route matches {request.method} {path} (names and ids never contain '/'); see /docs"
        elif exc.status_code == 405 and detail == "Method Not Allowed":
            # Starlette names only the methods of the first route matching the path; FastAPI makes one route
            # per method, so the answer must gather them from every route on the path.
            allowed = allowed_methods(request)
            if request.method == "OPTIONS":
                return Response(status_code=204, headers={"Allow": allowed})
            detail = f"{request.method} is not allowed on {path}; use {allowed}"
            return JSON({"detail": safe_text(detail)}, status_code=405, headers={"Allow": allowed})
        return JSON({"detail": safe_text(detail)}, status_code=exc.status_code, headers=getattr(exc, "headers", None))

    auth = [Depends(require_token)]
    app.include_router(steps.router, prefix="/api/v1", dependencies=auth, responses=API_ERRORS)
    app.include_router(runs.router, prefix="/api/v1", dependencies=auth, responses=API_ERRORS)
    app.include_router(sandbox.router, prefix="/api/v1", dependencies=auth, responses=API_ERRORS)
    app.include_router(schedules.router, prefix="/api/v1", dependencies=auth, responses=API_ERRORS)
    app.include_router(callbacks.router, prefix="/api/v1", responses=CALLBACK_ERRORS)
    app.include_router(ui.router)  # the web UI: its page at /, its files and the runs' live stream

    @app.get("/healthz", tags=["operations"],
             responses={200: {"model": Health}, 503: {"model": Health, "description": "the database is unreachable"},
                        **errors(413)})
    async def healthz(request: Request) -> Response:
        """200 when the database answers."""
        try:
            async with engine_of(request).store.engine.connect() as conn:
                await conn.execute(text("SELECT 1"))
        except Exception as exc:  # any database failure means "not healthy", never a 500
            OUTAGE.failed("GET /healthz", type(exc).__name__, request=True)
            return JSON({"status": "unavailable", "detail": f"database unreachable: {type(exc).__name__}"},
                        status_code=503)
        OUTAGE.reached()
        return JSON({"status": "ok"})

    @app.get("/metrics", tags=["operations"], response_class=Response,
             responses={200: {"content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}},
                              "description": "Prometheus text exposition format"}, **errors(413)})
    async def metrics(request: Request) -> Response:
        """Prometheus metrics."""
        await engine_metrics.refresh(engine_of(request).store)
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    build_document = app.openapi

    def document() -> dict[str, Any]:
        if app.openapi_schema is None:
            doc = build_document()
            _parameters_are_never_null(doc)
            _declare_the_token(doc)
        return app.openapi_schema or {}

    app.openapi = document  # type: ignore[method-assign]  # FastAPI's documented way to adjust its document

    app.put_in_front(settings)
    return app


def _parameters_are_never_null(doc: dict[str, Any]) -> None:
    """An optional header or query parameter is left out, never sent as null: drop the `null` FastAPI offers for
    `str | None` (a client following the document would otherwise send the text "null")."""
    for operations in doc.get("paths", {}).values():
        for operation in operations.values():
            for parameter in operation.get("parameters", []):
                schema = parameter.get("schema", {})
                options = [s for s in schema.get("anyOf", []) if s != {"type": "null"}]
                if "anyOf" in schema and len(options) == 1:
                    del schema["anyOf"]
                    schema.update(options[0])


def _declare_the_token(doc: dict[str, Any]) -> None:
    """The API token as a security scheme: needed by every /api/v1 route but the callbacks when the server has
    AETR_API_TOKEN set, and by none when it has not (hence the empty alternative)."""
    doc.setdefault("components", {})["securitySchemes"] = {"bearer": {
        "type": "http", "scheme": "bearer",
        "description": "the server's AETR_API_TOKEN, when it has one: `Authorization: Bearer <token>`"}}
    for path, operations in doc.get("paths", {}).items():
        if path.startswith("/api/v1/") and not path.startswith("/api/v1/callbacks/"):
            for operation in operations.values():
                operation["security"] = [{"bearer": []}, {}]


def engine_of_app(app: FastAPI) -> Engine:
    """The Engine an application serves."""
    engine: Engine = app.state.engine
    return engine
