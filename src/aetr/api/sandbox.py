"""Try a mapper or reducer in the server's sandbox, with the same limits runs get."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Body, Request, Response

from aetr.api.answers import Evaluation, errors
from aetr.api.http import JSON, engine_of, safe_text
from aetr.api.schemas import EvaluateIn
from aetr.domain.jsonvalue import check_json
from aetr.sandbox import ScriptError

router = APIRouter(tags=["sandbox"])


@router.post("/sandbox/evaluate", responses={200: {"model": Evaluation}, **errors(400, 415)})
async def evaluate(request: Request, body: Annotated[EvaluateIn, Body()]) -> Response:
    """`{ok: true, output}` or `{ok: false, error: {message, line, column, kind}}`: a script's failure is not an
    HTTP error."""
    ctx = body.ctx or {"run": {"id": None, "input": body.input}, "step": {"name": "test"}, "index": 0}
    try:
        output = await engine_of(request).sandbox.acall(body.source, [body.input, ctx])
    except ScriptError as exc:
        return JSON({"ok": False, "error": {"message": safe_text(exc.message), "line": exc.line,
                                            "column": exc.column, "kind": exc.kind}})
    try:
        check_json(output)
    except ValueError as exc:
        # V8 makes values that JSON answers cannot carry (too deep, lone surrogates): say so, as for a script error.
        return JSON({"ok": False, "error": {"message": f"the result is not a value AETR can keep: {exc}",
                                            "line": None, "column": None, "kind": "not_json"}})
    return JSON({"ok": True, "output": output})
