"""The JSON bodies the routes answer with, declared for the OpenAPI document (the routes build them themselves)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Final, Literal

from pydantic import BaseModel, Field

from aetr.domain.runs import NodeState
from aetr.domain.steps import StepKind
from aetr.sandbox import ScriptErrorKind


class Problem(BaseModel):
    """Every refused request: 4xx with this body, and nothing stored was changed."""

    detail: str = Field(description="what is wrong and where, and how to fix it")


WHY: dict[int, str] = {
    400: "the body is not valid JSON, or a header is malformed",
    401: "the API token is missing or wrong (only when the server has AETR_API_TOKEN set)",
    404: "no such step, run, node or callback token, or no route for the path",
    409: "refused in the current state: `detail` says why",
    412: "If-Match names another version than the stored one",
    413: "the request body is larger than AETR_MAX_PAYLOAD_BYTES",
    415: "the body is not sent as JSON (Content-Type: application/json)",
    422: "a parameter, field or the body is not valid: `detail` names it and the fix",
    503: "the database is unavailable or out of connections: try again after Retry-After seconds",
}
RETRY_AFTER = {"Retry-After": {"description": "seconds to wait before trying again", "schema": {"type": "integer"}}}


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The refusals a route may answer, each with the error body, for its `responses`."""
    return {status: {"model": Problem, "description": WHY[status]} | ({"headers": RETRY_AFTER} if status == 503 else {})
            for status in statuses}


# What any /api/v1 route may answer: the token (callbacks have none), the payload limit, a database outage.
API_ERRORS: Final = errors(401, 413, 422, 503)
CALLBACK_ERRORS: Final = errors(404, 413, 422, 503)
# Any 4xx, for a router whose routes do not list their refusals yet: prefer API_ERRORS and errors(...) per route,
# which the document then states and the fuzzer holds the server to.
ERRORS: Final[dict[int | str, dict[str, Any]]] = {
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
    max_concurrency: int | None = Field(None, description="present when set")


class LinkOut(BaseModel):
    mapper: str | None
    step: StepOut


class ChoiceLinkOut(LinkOut):
    when: str | None = Field(description="the condition; null on the default (last) link")


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


class MapStepOut(BaseModel):
    id: str
    name: str
    kind: Literal["map"]
    version: int
    items: str | None
    child: LinkOut
    max_concurrency: int | None
    tolerated_failures: int | str
    reducer: str


class ChoiceStepOut(BaseModel):
    id: str
    name: str
    kind: Literal["choice"]
    version: int
    children: list[ChoiceLinkOut]


class WaitStepOut(BaseModel):
    id: str
    name: str
    kind: Literal["wait"]
    version: int
    seconds: float | None = Field(None, description="a timed wait: how long")
    until: str | None = Field(None, description="a timed wait: the script giving its end")
    signal: bool | None = Field(None, description="true for a signal wait")
    timeout_s: float | None = Field(None, description="a signal wait: how long until it fails as a timeout")


StepOut = Annotated[ApiStepOut | SequentialStepOut | ParallelStepOut | MapStepOut | ChoiceStepOut | WaitStepOut,
                    Field(discriminator="kind")]
LinkOut.model_rebuild()
ChoiceLinkOut.model_rebuild()


class NodeStep(BaseModel):
    id: str
    name: str
    kind: StepKind
    version: int


class NodeError(BaseModel):
    message: str
    kind: str = Field(description="http | timeout | callback | mapper | reducer | cancelled | signal")
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
    wait_until: datetime | None = Field(description="a timed wait: when it ends")
    awaits_signal: bool = Field(description="a signal wait that waits for its answer")


class RunTreeOut(NodeOut):
    children: list[RunTreeOut]


class RunPage(BaseModel):
    runs: list[NodeOut] = Field(description="root nodes, newest first, without their children")
    next_cursor: str | None = Field(description="pass as `cursor` for the next page; null on the last one")


class PurgeOut(BaseModel):
    deleted: int = Field(description="how many ended runs were deleted, with their nodes and history")


class EventOut(BaseModel):
    id: int
    root_id: str
    node_id: str | None
    at: datetime
    kind: str
    data: dict[str, Any]


class ScriptFailure(BaseModel):
    message: str
    line: int | None = Field(description="the line of the script's own source it is on, from 1")
    column: int | None = Field(None, description="the column on that line, from 1 (syntax errors)")
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
