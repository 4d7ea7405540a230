"""The JSON bodies the routes answer with, declared for the OpenAPI document (the routes build them themselves)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field

from aetr.domain.runs import NodeState
from aetr.domain.steps import StepKind
from aetr.sandbox import ScriptErrorKind


class Problem(BaseModel):
    """Every refused request: 4xx with this body, and nothing stored was changed."""

    detail: str = Field(description="what is wrong and where, and how to fix it")


ERRORS: dict[int | str, dict[str, Any]] = {
    "4XX": {"model": Problem, "description": "refused: `detail` says what is wrong; nothing was changed"},
}


class StepSummary(BaseModel):
    id: str
    name: str
    kind: StepKind
    version: int
    updated_at: datetime


class RetryOut(BaseModel):
    max_attempts: int
    backoff_s: float
    max_backoff_s: float


class ApiStepOut(BaseModel):
    id: str
    name: str
    kind: Literal["api"]
    version: int
    url: str
    method: Literal["GET", "POST", "PUT", "PATCH", "DELETE"]
    headers: dict[str, str]
    mode: Literal["callback", "sync"]
    timeout_s: float
    heartbeat_s: float | None
    retry: RetryOut


class LinkOut(BaseModel):
    mapper: str | None
    step: StepOut


class SequentialStepOut(BaseModel):
    id: str
    name: str
    kind: Literal["sequential"]
    version: int
    children: list[LinkOut]


class ParallelStepOut(BaseModel):
    id: str
    name: str
    kind: Literal["parallel"]
    version: int
    reducer: str
    children: list[LinkOut]


StepOut = Annotated[ApiStepOut | SequentialStepOut | ParallelStepOut, Field(discriminator="kind")]
LinkOut.model_rebuild()


class NodeStep(BaseModel):
    id: str
    name: str
    kind: StepKind
    version: int


class NodeError(BaseModel):
    message: str
    kind: str = Field(description="http | timeout | callback | mapper | reducer | cancelled")
    node_id: str = Field(description="the node where the error started")
    step: str


class NodeOut(BaseModel):
    id: str
    root_id: str
    parent_id: str | None
    position: int
    step: NodeStep
    state: NodeState
    input: Any
    output: Any
    error: NodeError | None
    attempt: int
    version: int
    created_at: datetime
    started_at: datetime | None
    completed_at: datetime | None


class RunTreeOut(NodeOut):
    children: list[RunTreeOut]


class RunPage(BaseModel):
    runs: list[NodeOut] = Field(description="root nodes, newest first, without their children")
    next_cursor: str | None = Field(description="pass as `cursor` for the next page; null on the last one")


class EventOut(BaseModel):
    id: int
    root_id: str
    node_id: str | None
    at: datetime
    kind: str
    data: dict[str, Any]


class ScriptFailure(BaseModel):
    message: str
    line: int | None
    kind: ScriptErrorKind


class Evaluated(BaseModel):
    ok: Literal[True]
    output: Any


class EvaluationFailed(BaseModel):
    ok: Literal[False]
    error: ScriptFailure


Evaluation = Evaluated | EvaluationFailed


class CallbackAnswer(BaseModel):
    accepted: bool
    duplicate: bool = Field(False, description="true for a repeat of the callback already accepted")


class Health(BaseModel):
    status: Literal["ok", "unavailable"]
    detail: str | None = None
