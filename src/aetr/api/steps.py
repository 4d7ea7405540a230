"""Routes for step trees."""

from __future__ import annotations

import asyncio
import re
from typing import Annotated

from fastapi import APIRouter, Body, Header, HTTPException, Path, Query, Request, Response
from yarl import URL

from aetr.api.answers import StepOut, StepSummary, errors
from aetr.api.http import JSON, engine_of
from aetr.api.schemas import Name, StepIn, StepInModel, StepRef, flatten, scripts_of
from aetr.domain.kinds import ApiSpec
from aetr.domain.steps import CycleError, TreeTooBig
from aetr.engine.coordinator import utcnow
from aetr.sandbox import ScriptError
from aetr.store import StepsRefused

router = APIRouter(tags=["steps"])
StepKey = Annotated[StepRef, Path(description="a step's name, or its id")]
APPLIED_HEADER = "AETR-Applied"
# Its most bytes: common HTTP clients and proxies refuse a header line over 8 KB, and a tree of thousands of
# inline steps said them all. Past it, the pairs that fit (the step, then those created or changed) and `+more=N`.
APPLIED_MAX_BYTES = 4096
LEFT_OUT = "+more"  # not a step name: '+' is not allowed in one
VERSION_TAG = re.compile(r'(?:W/)?"?([0-9]{1,18})"?')  # If-Match: 3, "3" or W/"3"
# The same, for the document: FastAPI does not check it (a bad If-Match is answered 400, as HTTP would).
IF_MATCH_PATTERN = r'^[ \t]*(W/)?"?[0-9]{1,18}"?[ \t]*$'
ETAG = {"ETag": {"description": "the step's version", "schema": {"type": "string"}}}
# Where a client can go from a step it was given: its tree, its parents, its runs; starting one; deleting it.
STEP_LINKS = {
    "GetStep": {"operationId": "get_step", "parameters": {"name": "$response.body#/name"}},
    "StepParents": {"operationId": "step_parents", "parameters": {"name": "$response.body#/name"}},
    "ListRunsOfStep": {"operationId": "list_runs", "parameters": {"step": "$response.body#/name"}},
    "StartRun": {"operationId": "start_run", "requestBody": {"step": "$response.body#/name"}},
    "DeleteStep": {"operationId": "delete_step", "parameters": {"name": "$response.body#/name"}},
}


@router.put("/steps/{name}", status_code=200, responses={
    200: {"model": StepOut, "description": "replaced", "headers": ETAG, "links": STEP_LINKS},
    201: {"model": StepOut, "description": "created", "headers": ETAG, "links": STEP_LINKS},
    **errors(400, 404, 412, 415)})
async def put_step(
    request: Request,
    name: Annotated[Name, Path()],
    body: Annotated[StepIn, Body()],
    if_match: Annotated[str | None, Header(description="the version the change is based on: 3, \"3\" or W/\"3\"",
                                           json_schema_extra={"pattern": IF_MATCH_PATTERN})] = None,
    dry_run: Annotated[bool, Query(description="answer what the change would do, and keep nothing")] = False,
) -> Response:
    """Create or replace a step and every inline child, in one transaction. A step defined as it is stored is
    left unchanged, its version too. The `AETR-Applied` header says what became of each step defined:
    `name=created`, `name=changed` or `name=unchanged`, separated by spaces, the step first; past 4,096 bytes
    (thousands of inline steps), those that fit, created and changed ones first, then `+more=N` for the rest."""
    step: StepInModel = body
    if step.name != name:
        raise HTTPException(422, f"name: '{step.name}' in the body differs from '{name}' in the path")
    expected: int | None = None
    if if_match is not None:
        tag = VERSION_TAG.fullmatch(if_match.strip())
        if tag is None:
            raise HTTPException(400, "If-Match must be the step's version number, e.g. If-Match: 3")
        expected = int(tag.group(1))
    try:
        defs = flatten(step)
    except ValueError as exc:
        raise HTTPException(422, str(exc)) from None
    engine = engine_of(request)
    if (allowed := engine.settings.allowed_step_hosts) is not None:
        for d in defs:
            spec = d.config.spec
            if isinstance(spec, ApiSpec) and (problem := allowed.url_host_problem(URL(spec.url).raw_host or "")):
                raise HTTPException(422, f"step '{d.config.name}', url: {problem}: use a host it allows, or have "
                                         "the server's operator add this one")
    for where, source in scripts_of(defs):
        try:
            await asyncio.to_thread(engine.sandbox.check, source)  # up to the time limit: off the event loop
        except ScriptError as exc:
            at = f" ({exc.where} of the script)" if exc.where else ""
            raise HTTPException(422, f"{where} does not compile{at}: {exc.message}") from None
    try:
        applied = await engine.store.apply_steps(defs, expected, utcnow(), engine.settings.max_tree_nodes,
                                                 dry_run=dry_run)
    except (CycleError, TreeTooBig) as exc:
        raise HTTPException(422, str(exc)) from None
    except StepsRefused as exc:
        raise HTTPException(exc.status, exc.detail) from None
    tree = applied.tree
    headers = {"ETag": str(tree.config.version), APPLIED_HEADER: applied_header(applied.outcomes)}
    return JSON(tree.to_json(), status_code=201 if applied.created and not dry_run else 200, headers=headers)


def applied_header(outcomes: dict[str, str]) -> str:
    """`name=outcome` pairs, the step first (step names are letters, digits, '-', '_' and '.': safe in a header as
    they are); when they would not fit in APPLIED_MAX_BYTES, the step, then as many created or changed ones, then
    unchanged ones, as fit, and `+more=N` for the N left out."""
    pairs = [f"{name}={outcome}" for name, outcome in outcomes.items()]
    whole = " ".join(pairs)
    if len(whole) <= APPLIED_MAX_BYTES:
        return whole
    first, rest = pairs[0], pairs[1:]
    kept = [first]
    size = len(first) + len(f" {LEFT_OUT}={len(pairs)}")
    for pair in sorted(rest, key=lambda pair: pair.endswith("=unchanged")):  # stable: the given order otherwise
        if size + 1 + len(pair) > APPLIED_MAX_BYTES:
            break
        kept.append(pair)
        size += 1 + len(pair)
    return " ".join([*kept, f"{LEFT_OUT}={len(pairs) - len(kept)}"])


@router.get("/steps", responses={200: {"model": list[StepSummary]}})
async def list_steps(request: Request) -> Response:
    """Every step: id, name, kind, version, updated_at; sorted by name."""
    return JSON(await engine_of(request).store.list_steps())


@router.get("/steps/{name}", responses={
    200: {"model": StepOut, "headers": ETAG, "links": {k: v for k, v in STEP_LINKS.items() if k != "GetStep"}},
    **errors(404)})
async def get_step(request: Request, name: StepKey) -> Response:
    """The resolved tree of a step, by name or id, rebuilt in one recursive query."""
    tree = await engine_of(request).store.get_step_tree(name)
    if tree is None:
        raise HTTPException(404, f"no step named (or with id) '{name}'")
    return JSON(tree.to_json(), headers={"ETag": str(tree.config.version)})


@router.get("/steps/{name}/parents", responses={200: {"model": list[str]}, **errors(404)})
async def step_parents(request: Request, name: Annotated[StepRef, Path()]) -> Response:
    """The names of the steps that have this one as a child."""
    parents = await engine_of(request).store.step_parents(name)
    if parents is None:
        raise HTTPException(404, f"no step named '{name}'")
    return JSON(parents)


@router.delete("/steps/{name}", status_code=204, responses=errors(404, 409))
async def delete_step(request: Request, name: Annotated[StepRef, Path()]) -> Response:
    """Delete a step that no parent uses (409 with the parents' names otherwise)."""
    try:
        deleted = await engine_of(request).store.delete_step(name)
    except StepsRefused as exc:
        raise HTTPException(exc.status, exc.detail) from None
    if not deleted:
        raise HTTPException(404, f"no step named '{name}'")
    return Response(status_code=204)
