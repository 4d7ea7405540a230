"""Try a mapper or reducer in the server's sandbox, with the same limits runs get."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Body, Request, Response

from aetr.api.app import JSON, engine_of
from aetr.api.schemas import EvaluateIn
from aetr.sandbox import ScriptError

router = APIRouter(tags=["sandbox"])


@router.post("/sandbox/evaluate")
async def evaluate(request: Request, body: Annotated[EvaluateIn, Body()]) -> Response:
    """`{ok: true, output}` or `{ok: false, error: {message, line, kind}}`: a script's failure is not an HTTP error."""
    ctx = body.ctx or {"run": {"id": None, "input": body.input}, "step": {"name": "test"}, "index": 0}
    try:
        output = await engine_of(request).sandbox.acall(body.source, [body.input, ctx])
    except ScriptError as exc:
        return JSON({"ok": False, "error": {"message": exc.message, "line": exc.line, "kind": exc.kind}})
    return JSON({"ok": True, "output": output})
