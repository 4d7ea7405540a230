"""Request bodies of the HTTP API, validated by pydantic, and their translation into domain values."""

from __future__ import annotations

from collections import deque
from typing import Annotated, Any, Final, Literal
from urllib.parse import urlsplit

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic.config import JsonDict
from yarl import URL

from aetr.domain.jsonvalue import MAX_TREE_DEPTH, check_json
from aetr.domain.kinds import ApiSpec, ChoiceSpec, MapSpec, ParallelSpec, SequentialSpec, Spec, WaitSpec, choice, wait
from aetr.domain.steps import (
    BUILTIN_REDUCERS,
    FRAMING_HEADERS,
    NAME_PATTERN,
    Link,
    RetryPolicy,
    StepConfig,
    StepDef,
    framing_headers,
)
from aetr.store.store import CURSOR_PATTERN

# Looking a step up accepts every name a step could ever be stored under, dots alone included (refused for new
# steps since), so that such a step can still be read and deleted.
LOOKUP_PATTERN: Final = r"^[A-Za-z0-9_.\-]{1,200}$"
NO_NUL_PATTERN: Final = r"^[^\x00]*$"
HEADER_VALUE_PATTERN: Final = r"^[^\x00-\x08\x0a-\x1f\x7f]*$"
# A share of a map's items, at most all of them: "10%", "2.5%", "100%".
PERCENT_PATTERN: Final = r"^(100(\.0{1,4})?|[0-9]{1,2}(\.[0-9]{1,4})?)%$"
# The step URLs the document promises to accept: http(s), a host name (labels of at most 63 characters) or an
# IPv4 address, an optional port up to 65535, then printable ASCII. The server accepts more (IPv6 literals, printable
# non-ASCII text, which it encodes when it calls), as ApiStepIn._http_url checks.
URL_PATTERN: Final = (r"^[Hh][Tt][Tt][Pp][Ss]?://([A-Za-z0-9._~!$&'()*+,;=%-]*@)?"
                      r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*"
                      r"(:(6553[0-5]|655[0-2][0-9]|65[0-4][0-9]{2}|6[0-4][0-9]{3}|[1-5][0-9]{4}|[0-9]{1,4}))?"
                      r"([/?#][!-~]*)?$")
# The start of a run's id: 4 to 32 of its hex digits, hyphens anywhere (they are left out when matching).
ID_PREFIX_PATTERN: Final = r"^-*(?:[0-9a-fA-F]-*){4,32}$"
# What each pattern asks for, in words: a 422 says this instead of the regular expression.
PATTERN_HINTS: Final = {
    NAME_PATTERN: "must be 1–200 letters, digits, '-', '_' or '.', and not dots alone (such as '.' or '..')",
    LOOKUP_PATTERN: "must be 1–200 letters, digits, '-', '_' or '.'",
    NO_NUL_PATTERN: "must not contain NUL characters (\\u0000)",
    HEADER_VALUE_PATTERN: "must not contain control characters such as line breaks or NUL",
    ID_PREFIX_PATTERN: "must be the start of a run id: 4 to 32 of its hex digits (0-9, a-f), e.g. 01a23b06",
    PERCENT_PATTERN: "must be a whole count of items, or a percentage of them such as \"10%\"",
    CURSOR_PATTERN: "must be the next_cursor of a previous page (microseconds, a dot, and 32 hexadecimal digits)",
}

Name = Annotated[str, Field(pattern=NAME_PATTERN, min_length=1, max_length=200,
                            description="1–200 letters, digits, '-', '_' or '.'; not dots alone")]
StepRef = Annotated[str, Field(pattern=LOOKUP_PATTERN, min_length=1, max_length=200,
                               description="a stored step's name, or its id")]
Script = Annotated[str, Field(min_length=1, max_length=65_536, pattern=NO_NUL_PATTERN)]
MAX_TIMEOUT_S = 30 * 86_400.0  # a step may take up to 30 days
MAX_WAIT_S = 366 * 86_400.0  # a wait may last up to a year
MAX_CHILDREN = 100_000

JsonValue = Annotated[Any, AfterValidator(check_json)]


def http_url(value: str) -> str:
    """`value` when it is an absolute http(s) URL AETR can call; ValueError saying what is wrong and the fix
    otherwise (the field's name is added by the validation error's location)."""
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError on a malformed port
    except ValueError as exc:
        raise ValueError(f"is not a valid URL: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an absolute http:// or https:// URL with a host")
    if any(c.isspace() or not c.isprintable() for c in value):
        raise ValueError("must not contain spaces, control or invisible characters: percent-encode them")
    try:
        URL(value)  # what calls it: a host it cannot encode (an over-long label, say) would fail every call
    except ValueError as exc:
        raise ValueError(f"is not a valid URL: {exc}") from None
    return value


class Strict(BaseModel):
    """Unknown fields are refused: a typo must not be silently ignored."""

    model_config = ConfigDict(extra="forbid")


MAX_OLDER_THAN_S = 36_525 * 86_400  # a hundred years, in seconds


class PurgeIn(Strict):
    """Which ended runs a purge deletes."""

    older_than_s: float = Field(ge=0, le=MAX_OLDER_THAN_S, allow_inf_nan=False, strict=True,
                                description="seconds since their end: runs that ended longer ago are deleted "
                                            "(0: every ended run)")


class RetryIn(Strict):
    max_attempts: int = Field(3, ge=1, le=100)
    backoff_s: float = Field(1.0, ge=0, le=86_400)
    max_backoff_s: float = Field(60.0, ge=0, le=86_400)


def _any_case(word: str) -> str:
    return "".join(f"[{c.upper()}{c.lower()}]" if c.isalpha() else c for c in word)  # names: letters and "-"


HEADER_NAME_PATTERN: Final = r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$"
FRAMING_PATTERN: Final = "^(" + "|".join(_any_case(name) for name in sorted(FRAMING_HEADERS)) + ")$"


def _headers_schema(schema: dict[str, Any]) -> None:
    """State every rule on a step's headers: any name not a token, and the framing names, are refused."""
    value = next(iter(schema.pop("patternProperties", {}).values()), {"type": "string"})
    schema["propertyNames"] = {"minLength": 1, "maxLength": 256, "pattern": HEADER_NAME_PATTERN,
                               "not": {"pattern": FRAMING_PATTERN}}
    schema["additionalProperties"] = value


class StepBase(Strict):
    name: Name
    # Read-only fields that GET returns; accepted so that a fetched tree can be edited and PUT back.
    id: str | None = Field(None, description="ignored on write")
    version: int | None = Field(None, description="ignored on write; use If-Match")


class ApiStepIn(StepBase):
    kind: Literal["api"]
    url: str = Field(max_length=4096, json_schema_extra={"pattern": URL_PATTERN},
                     description="an absolute http:// or https:// URL with a host; spaces, control and invisible "
                                 "characters must be percent-encoded. With AETR_ALLOWED_STEP_HOSTS set, its host must "
                                 "be allowed (422 otherwise)")
    method: Literal["GET", "POST", "PUT", "PATCH", "DELETE"] = "POST"
    headers: dict[Annotated[str, Field(min_length=1, max_length=256, pattern=HEADER_NAME_PATTERN)],
                  Annotated[str, Field(max_length=8192, pattern=HEADER_VALUE_PATTERN)]] = Field(
        default_factory=dict, json_schema_extra=_headers_schema,
        description="sent with each call; framing and hop-by-hop headers (Content-Length, "
                    "Transfer-Encoding, Connection, Keep-Alive, Upgrade, TE, Trailer, Host) "
                    "are refused")
    mode: Literal["callback", "sync"] = "callback"
    timeout_s: float = Field(3600.0, gt=0, le=MAX_TIMEOUT_S)
    heartbeat_s: float | None = Field(None, gt=0, le=MAX_TIMEOUT_S)
    retry: RetryIn = Field(default_factory=lambda: RetryIn())
    max_concurrency: int | None = Field(None, ge=1, le=1_000_000,
                                        description="attempts of this step in flight at most, across all runs "
                                                    "and processes; more wait as pending, in the order they "
                                                    "became due")

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        return http_url(value)

    @field_validator("headers")
    @classmethod
    def _no_framing_headers(cls, value: dict[str, str]) -> dict[str, str]:
        refused = framing_headers(value)
        if refused:
            raise ValueError(f"{', '.join(refused)} may not be set: AETR's HTTP client frames each request and "
                             "manages its connection itself (Content-Length, Transfer-Encoding, Connection, "
                             "Keep-Alive, Upgrade, TE, Trailer and Host are refused): remove them")
        return value


class ChildIn(Strict):
    step: Annotated[Name | StepIn, Field(description="a stored step's name, or an inline step")]
    mapper: Script | None = None


class SequentialIn(StepBase):
    kind: Literal["sequential"]
    children: list[ChildIn] = Field(default_factory=list, max_length=MAX_CHILDREN)


class ParallelIn(StepBase):
    kind: Literal["parallel"]
    children: list[ChildIn] = Field(default_factory=list, max_length=MAX_CHILDREN)
    reducer: Script = Field("array", description="array | last | merge | JavaScript (outputs, ctx) => value")


class MapIn(StepBase):
    kind: Literal["map"]
    items: Script | None = Field(None, description="JavaScript (input, ctx) => array; without it the map's input "
                                                   "must be the array")
    child: ChildIn = Field(description="the step run once per item; its mapper gets (item, ctx), ctx.index = i")
    max_concurrency: int | None = Field(None, ge=1, le=1_000_000,
                                        description="item subtrees unfinished at once, at most; the next starts, "
                                                    "in item order, as one finishes")
    tolerated_failures: Annotated[int, Field(ge=0, le=1_000_000_000)] | Annotated[str, Field(
        pattern=PERCENT_PATTERN)] = Field(0, description="items that may fail without failing the map: a count, "
                                                         "or a percentage of the items such as \"10%\"")
    reducer: Script = Field("array", description="array | last | merge | JavaScript (outputs, ctx) => value, "
                                                 "over the item outputs in item order")

    @field_validator("tolerated_failures")
    @classmethod
    def _at_most_all(cls, value: int | str) -> int | str:
        if isinstance(value, str) and float(value[:-1]) > 100:
            raise ValueError("tolerated_failures may be at most 100%")
        return value


class ChoiceChildIn(ChildIn):
    when: Script | None = Field(None, description="JavaScript (input, ctx) => true | false; without it the link "
                                                  "always matches, and may only be the last one")


class ChoiceIn(StepBase):
    kind: Literal["choice"]
    children: list[ChoiceChildIn] = Field(default_factory=list, max_length=MAX_CHILDREN)

    @model_validator(mode="after")
    def _default_last(self) -> ChoiceIn:
        problem = choice.check([c.when for c in self.children])
        if problem:
            raise ValueError(problem)
        return self


# Exactly one way to wait, as JSON Schema says it; null stands for an absent field, as pydantic reads it.
_ABSENT: Final[JsonDict] = {"type": "null"}
WAIT_WAYS: Final[JsonDict] = {"oneOf": [
    {"required": ["seconds"], "properties": {"seconds": {"type": "number"}, "until": _ABSENT,
                                             "signal": {"enum": [False, None]}, "timeout_s": _ABSENT}},
    {"required": ["until"], "properties": {"seconds": _ABSENT, "until": {"type": "string"},
                                           "signal": {"enum": [False, None]}, "timeout_s": _ABSENT}},
    {"required": ["signal"], "properties": {"seconds": _ABSENT, "until": _ABSENT, "signal": {"const": True}}},
]}


class WaitIn(StepBase):
    model_config = ConfigDict(json_schema_extra=WAIT_WAYS)

    kind: Literal["wait"]
    seconds: float | None = Field(None, ge=0, le=MAX_WAIT_S, description="wait this long")
    until: Script | None = Field(None, description="JavaScript (input, ctx) => ISO 8601 time or epoch seconds")
    signal: bool | None = Field(None, description="true: wait until someone answers "
                                                  "POST /api/v1/runs/{run_id}/nodes/{node_id}/signal")
    timeout_s: float | None = Field(None, gt=0, le=MAX_WAIT_S, description="a signal wait fails as `timeout` "
                                                                           "after this long (default 3600)")

    @model_validator(mode="after")
    def _one_way_to_wait(self) -> WaitIn:
        problem = wait.check(self.seconds, self.until, self.signal)
        if problem:
            raise ValueError(problem)
        if self.timeout_s is not None and not self.signal:
            raise ValueError("timeout_s applies to a signal wait only: a timed wait ends on its own")
        return self


StepInModel = ApiStepIn | SequentialIn | ParallelIn | MapIn | ChoiceIn | WaitIn
StepIn = Annotated[StepInModel, Field(discriminator="kind")]
ChildIn.model_rebuild()
ChoiceChildIn.model_rebuild()
MapIn.model_rebuild()


class RunIn(Strict):
    step: Annotated[StepRef, Field(description="a step's name or id")]
    input: JsonValue = None
    notify: str | None = Field(None, max_length=4096,
                               description="http:// or https:// URL told of the run's end with a CloudEvent; with "
                                           "AETR_ALLOWED_STEP_HOSTS set, its host must be allowed (422 otherwise)")

    @field_validator("notify")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        return None if value is None else http_url(value)


class SignalIn(Strict):
    model_config = ConfigDict(json_schema_extra={"oneOf": [
        {"required": ["output"], "not": {"required": ["error"]}},
        {"required": ["error"], "not": {"required": ["output"]}, "properties": {"error": {"type": "string"}}}]})

    output: JsonValue = Field(None, description="completes the wait with this output")
    error: Annotated[str, Field(min_length=1, max_length=65_536)] | None = Field(
        None, description="fails the wait (error kind `signal`) with this message")

    @model_validator(mode="after")
    def _one_answer(self) -> SignalIn:
        given = self.model_fields_set & {"output", "error"}
        if len(given) != 1 or (given == {"error"} and self.error is None):
            raise ValueError("send exactly one of `output` (any JSON: the wait completes with it) or `error` "
                             "(a message: the wait fails)")
        return self


class FailIn(Strict):
    error: Annotated[str, Field(min_length=1, max_length=65_536)]
    retryable: bool = False


class EvaluateIn(Strict):
    # A reducer is given the list of child outputs: its input must be an array.
    model_config = ConfigDict(json_schema_extra={"oneOf": [
        {"properties": {"kind": {"const": "mapper"}}},
        {"required": ["kind", "input"], "properties": {"kind": {"const": "reducer"}, "input": {"type": "array"}}}]})

    source: Script
    kind: Literal["mapper", "reducer"] = "mapper"
    input: JsonValue = None
    ctx: dict[str, JsonValue] | None = None

    @model_validator(mode="after")
    def _reducer_takes_a_list(self) -> EvaluateIn:
        if self.kind == "reducer" and not isinstance(self.input, list):
            raise ValueError("a reducer's input is the list of child outputs: pass a JSON array")
        return self


def flatten(root: StepInModel) -> list[StepDef]:
    """The body's steps, root first, each inline child replaced by a link to its name."""
    defs: list[StepDef] = []
    seen: dict[str, StepInModel] = {}
    queue: deque[tuple[StepInModel, int]] = deque([(root, 1)])
    while queue:
        step, level = queue.popleft()
        if level > MAX_TREE_DEPTH:
            raise ValueError(f"step '{step.name}' sits {level} levels deep, and a step tree may nest at most "
                             f"{MAX_TREE_DEPTH}: flatten the tree")
        if step.name in seen:
            if seen[step.name] != step:
                raise ValueError(f"step '{step.name}' is defined twice in this request, differently: define it once "
                                 "and refer to it by name elsewhere")
            continue
        seen[step.name] = step
        links: list[Link] = []
        for child in _links_of(step):
            if isinstance(child.step, str):
                links.append(Link(child.step, child.mapper))
            else:
                links.append(Link(child.step.name, child.mapper))
                queue.append((child.step, level + 1))
        defs.append(StepDef(StepConfig(name=step.name, spec=_spec_of(step)), tuple(links)))
    return defs


def _links_of(step: StepInModel) -> list[ChildIn]:
    if isinstance(step, SequentialIn | ParallelIn | ChoiceIn):
        return list(step.children)
    if isinstance(step, MapIn):
        return [step.child]
    return []


def _spec_of(step: StepInModel) -> Spec:
    """A step's kind-specific fields as the domain holds them."""
    if isinstance(step, ApiStepIn):
        return ApiSpec(url=step.url, method=step.method, headers=dict(step.headers), mode=step.mode,
                       timeout_s=step.timeout_s, heartbeat_s=step.heartbeat_s,
                       retry=RetryPolicy(**step.retry.model_dump()), max_concurrency=step.max_concurrency)
    if isinstance(step, SequentialIn):
        return SequentialSpec()
    if isinstance(step, ParallelIn):
        return ParallelSpec(reducer=step.reducer)
    if isinstance(step, MapIn):
        return MapSpec(items=step.items, max_concurrency=step.max_concurrency,
                       tolerated_failures=step.tolerated_failures, reducer=step.reducer)
    if isinstance(step, ChoiceIn):
        return ChoiceSpec(conditions=tuple(c.when for c in step.children))
    return WaitSpec(seconds=step.seconds, until=step.until, signal=bool(step.signal),
                    timeout_s=step.timeout_s if step.timeout_s is not None else wait.DEFAULT_SIGNAL_TIMEOUT_S)


def scripts_of(defs: list[StepDef]) -> list[tuple[str, str]]:
    """Every JavaScript source in the definitions, with where it sits (for checking at save time)."""
    out: list[tuple[str, str]] = []
    for d in defs:
        name = d.config.name
        for pos, link in enumerate(d.links):
            if link.mapper is not None:
                out.append((f"step '{name}', child {pos} ('{link.step}') mapper", link.mapper))
        spec = d.config.spec
        if isinstance(spec, ParallelSpec | MapSpec) and spec.reducer not in BUILTIN_REDUCERS:
            out.append((f"step '{name}' reducer", spec.reducer))
        if isinstance(spec, MapSpec) and spec.items is not None:
            out.append((f"step '{name}' items", spec.items))
        if isinstance(spec, ChoiceSpec):
            out.extend((f"step '{name}', child {pos} ('{d.links[pos].step}') when", when)
                       for pos, when in enumerate(spec.conditions) if when is not None)
        if isinstance(spec, WaitSpec) and spec.until is not None:
            out.append((f"step '{name}' until", spec.until))
    return out
