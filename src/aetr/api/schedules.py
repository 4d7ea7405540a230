"""Routes for schedules: runs started by the clock."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Body, HTTPException, Path, Request, Response
from pydantic import BaseModel, Field, field_validator
from yarl import URL

from aetr.api.answers import errors
from aetr.api.http import JSON, engine_of
from aetr.api.schemas import URL_PATTERN, JsonValue, Name, StepRef, Strict, http_url
from aetr.domain.schedules import Schedule, StoredSchedule, cron_problem, zone
from aetr.engine.runtime import Engine
from aetr.store.schedules import ScheduledRun

router = APIRouter(tags=["schedules"])
# Five fields of the characters cron allows; what a pattern cannot say (ranges, a date that never comes) is
# checked by croniter, refused with 422.
CRON_PATTERN = r"^\s*[0-9A-Za-z*,/?#LW-]+(\s+[0-9A-Za-z*,/?#LW-]+){4}\s*$"
LAST_RUNS = 5  # runs shown with each schedule, newest first
ScheduleName = Annotated[Name, Path(description="the schedule's name")]


class ScheduleIn(Strict):
    """A schedule's definition (PUT)."""

    step: Annotated[StepRef, Field(description="the name (or id) of the step each run starts")]
    cron: str = Field(max_length=200, json_schema_extra={"pattern": CRON_PATTERN},
                      description="five fields: minute hour day-of-month month day-of-week; one that never "
                                  "comes (0 0 31 2 *) is refused")
    timezone: str = Field("UTC", max_length=64, description="the IANA time zone the cron fields are read in")
    enabled: bool = Field(True, description="false pauses it: no run starts, and resuming starts none it missed")
    input: JsonValue = Field(None, description="each run's input")
    notify: str | None = Field(None, max_length=4096, json_schema_extra={"pattern": URL_PATTERN},
                               description="http(s) URL told when each run ends; with AETR_ALLOWED_STEP_HOSTS set, "
                                           "its host must be allowed")
    # Read-only fields that GET returns: accepted so that a fetched schedule can be edited and PUT back.
    name: Name | None = Field(None, description="must match the path when given")
    next_run_at: datetime | None = Field(None, description="ignored on write")
    last_runs: list[Any] | None = Field(None, description="ignored on write")
    created_at: datetime | None = Field(None, description="ignored on write")
    updated_at: datetime | None = Field(None, description="ignored on write")

    @field_validator("cron")
    @classmethod
    def _cron(cls, value: str) -> str:
        problem = cron_problem(value)
        if problem:
            raise ValueError(problem)
        return " ".join(value.split())

    @field_validator("timezone")
    @classmethod
    def _zone(cls, value: str) -> str:
        zone(value)
        return value

    @field_validator("notify")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        return None if value is None else http_url(value)


class ScheduledRunOut(BaseModel):
    id: str | None = Field(description="the run; null when none was started (see error)")
    state: Literal["pending", "executing", "complete", "error", "cancelled", "starting", "refused", "deleted"] = \
        Field(description="the run's state; `starting` while its start is under way, `refused` when the step "
                          "could not start (see error), `deleted` when the run is gone")
    due_at: datetime = Field(description="the due time it was started for")
    created_at: datetime = Field(description="when the run was created (or the due time claimed)")
    error: str | None = None


class ScheduleOut(BaseModel):
    name: str
    step: str
    cron: str
    timezone: str
    enabled: bool
    input: Any
    notify: str | None
    next_run_at: datetime | None = Field(description="the next due time, UTC; null while paused")
    last_runs: list[ScheduledRunOut] = Field(description="the latest runs it started, newest first")
    created_at: datetime
    updated_at: datetime


def _run_json(run: ScheduledRun) -> dict[str, Any]:
    if run.error is not None:
        state = "refused"
    elif run.run_id is None:
        state = "starting"
    else:
        state = run.state or "deleted"
    return {"id": run.run_id, "state": state, "due_at": run.due_at, "created_at": run.created_at or run.claimed_at,
            "error": run.error}


def _schedule_json(stored: StoredSchedule, runs: list[ScheduledRun]) -> dict[str, Any]:
    s = stored.schedule
    return {"name": s.name, "step": s.step, "cron": s.cron, "timezone": s.timezone, "enabled": s.enabled,
            "input": s.input, "notify": s.notify, "next_run_at": stored.next_run_at,
            "last_runs": [_run_json(r) for r in runs], "created_at": stored.created_at,
            "updated_at": stored.updated_at}


async def _answer(engine: Engine, stored: StoredSchedule, status: int = 200) -> Response:
    runs = await engine.store.schedules.last_runs([stored.id], LAST_RUNS)
    return JSON(_schedule_json(stored, runs.get(stored.id, [])), status_code=status)


@router.put("/schedules/{name}", status_code=200, responses={
    200: {"model": ScheduleOut, "description": "replaced"}, 201: {"model": ScheduleOut, "description": "created"},
    **errors(400, 415, 422)})
async def put_schedule(request: Request, name: ScheduleName, body: Annotated[ScheduleIn, Body()]) -> Response:
    """Create or replace a schedule. A replacement on the same cron and zone keeps its next due time."""
    if body.name is not None and body.name != name:
        raise HTTPException(422, f"name: '{body.name}' in the body differs from '{name}' in the path")
    engine = engine_of(request)
    if body.notify is not None and (allowed := engine.settings.allowed_step_hosts) is not None and (
            problem := allowed.url_host_problem(URL(body.notify).raw_host or "")):
        raise HTTPException(422, f"notify: {problem}: use a host it allows, or have the server's operator add "
                                 "this one")
    if not await engine.store.schedules.step_exists(body.step):
        raise HTTPException(422, f"step: no step named (or with id) '{body.step}'; create it with "
                                 "PUT /api/v1/steps first")
    schedule = Schedule(name=name, step=body.step, cron=body.cron, timezone=body.timezone, enabled=body.enabled,
                        input=body.input, notify=body.notify)
    created, stored = await engine.store.schedules.put(schedule, engine.schedules.clock())
    return await _answer(engine, stored, 201 if created else 200)


@router.get("/schedules", responses={200: {"model": list[ScheduleOut]}})
async def list_schedules(request: Request) -> Response:
    """Every schedule, by name, with its next due time and latest runs."""
    store = engine_of(request).store.schedules
    found = await store.all()
    runs = await store.last_runs([s.id for s in found], LAST_RUNS)
    return JSON([_schedule_json(s, runs.get(s.id, [])) for s in found])


@router.get("/schedules/{name}", responses={200: {"model": ScheduleOut}, **errors(404)})
async def get_schedule(request: Request, name: ScheduleName) -> Response:
    """One schedule, with its next due time and latest runs."""
    engine = engine_of(request)
    stored = await engine.store.schedules.get(name)
    if stored is None:
        raise HTTPException(404, f"no schedule named '{name}'")
    return await _answer(engine, stored)


@router.delete("/schedules/{name}", status_code=204, response_class=Response, responses=errors(404))
async def delete_schedule(request: Request, name: ScheduleName) -> Response:
    """Delete a schedule; the runs it started are kept."""
    if not await engine_of(request).store.schedules.delete(name):
        raise HTTPException(404, f"no schedule named '{name}'")
    return Response(status_code=204)
