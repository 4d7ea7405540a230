"""The kinds of step, one module each: its fields, how it starts, how it reacts when a child ends, its output
and its redrive. Code that must treat kinds differently matches on `Spec` exhaustively (`match` and
`assert_never`), so a kind left out is a type error, never a silent fall-through."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal, assert_never

from aetr.domain.kinds.api import ApiSpec
from aetr.domain.kinds.choice import ChoiceSpec
from aetr.domain.kinds.map import MapSpec
from aetr.domain.kinds.parallel import ParallelSpec
from aetr.domain.kinds.sequential import SequentialSpec
from aetr.domain.kinds.wait import WaitSpec

Spec = ApiSpec | SequentialSpec | ParallelSpec | MapSpec | ChoiceSpec | WaitSpec
StepKind = Literal["api", "sequential", "parallel", "map", "choice", "wait"]
# Kinds whose run nodes count their finished children (an atomic counter per node, see Plan.counters).
COUNTING: frozenset[str] = frozenset({"parallel", "map"})


def spec_from_json(kind: str, fields: Mapping[str, Any]) -> Spec:
    """A kind's fields from their stored form; ValueError for a kind this version does not know."""
    match kind:
        case "api":
            return ApiSpec.from_json(fields)
        case "sequential":
            return SequentialSpec.from_json(fields)
        case "parallel":
            return ParallelSpec.from_json(fields)
        case "map":
            return MapSpec.from_json(fields)
        case "choice":
            return ChoiceSpec.from_json(fields)
        case "wait":
            return WaitSpec.from_json(fields)
    raise ValueError(f"unknown step kind {kind!r}")


def has_children(spec: Spec) -> bool:
    """Whether steps of this kind have child links."""
    match spec:
        case ApiSpec() | WaitSpec():
            return False
        case SequentialSpec() | ParallelSpec() | MapSpec() | ChoiceSpec():
            return True
        case _:
            assert_never(spec)


__all__ = ["COUNTING", "ApiSpec", "ChoiceSpec", "MapSpec", "ParallelSpec", "SequentialSpec", "Spec",
           "StepKind", "WaitSpec", "has_children", "spec_from_json"]
