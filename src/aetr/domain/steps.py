"""Step trees: the definitions users compose, and the checks they must pass."""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from aetr.domain.kinds import ChoiceSpec, MapSpec, Spec, StepKind, has_children, spec_from_json
from aetr.domain.kinds.api import DEFAULT_TIMEOUT_S, RetryPolicy
from aetr.domain.kinds.parallel import BUILTIN_REDUCERS
from aetr.domain.runs import DEFAULT_MAX_TREE_NODES

__all__ = ["BUILTIN_REDUCERS", "DEFAULT_MAX_TREE_NODES", "DEFAULT_TIMEOUT_S", "RetryPolicy", "StepKind"]

# A step's name: 1-200 letters, digits, '-', '_' or '.', not dots alone ('.' and '..' are path segments that
# URLs resolve away, so no link could name such a step). Written without look-arounds, which pydantic's regular
# expressions lack; the length is checked apart.
NAME_PATTERN = r"^[A-Za-z0-9_.\-]*[A-Za-z0-9_\-][A-Za-z0-9_.\-]*$"
NAME_RE = re.compile(NAME_PATTERN)
MAX_NAME_LENGTH = 200


def is_step_name(name: str) -> bool:
    """Whether `name` may name a new step."""
    return len(name) <= MAX_NAME_LENGTH and NAME_RE.fullmatch(name) is not None


# Headers a step may not set: they frame the request or belong to one connection, which AETR's HTTP client
# manages (a Content-Length of the step's own made the step read a truncated body).
FRAMING_HEADERS = frozenset({"content-length", "transfer-encoding", "connection", "keep-alive", "upgrade", "te",
                             "trailer", "host"})


def framing_headers(headers: Mapping[str, str]) -> list[str]:
    """The names among `headers` that a step may not set (framing and hop-by-hop headers), as written."""
    return [name for name in headers if name.lower() in FRAMING_HEADERS]


@dataclass(frozen=True)
class StepConfig:
    """A step's own fields, without its children: what a run node is frozen with. `spec` holds the fields of
    its kind (aetr.domain.kinds)."""

    name: str
    spec: Spec
    id: str = ""
    version: int = 0

    @property
    def kind(self) -> StepKind:
        """The step's kind."""
        return self.spec.KIND

    def fields_json(self) -> dict[str, Any]:
        """The kind-specific fields, as stored."""
        return self.spec.to_json()

    @functools.cached_property
    def fields_text(self) -> str:
        """`fields_json` encoded, as each run node stores it: once per config, not once per node started."""
        return orjson.dumps(self.fields_json()).decode()

    @staticmethod
    def from_json(name: str, kind: str, fields: Mapping[str, Any], *, id: str = "",
                  version: int = 0) -> StepConfig:
        """Rebuild a config from stored fields (already validated when written)."""
        return StepConfig(name=name, spec=spec_from_json(kind, fields), id=id, version=version)


@dataclass(frozen=True)
class Link:
    """A parent→child edge: the child step and the mapper that belongs to this position."""

    step: str  # the child's name
    mapper: str | None = None


@dataclass(frozen=True)
class StepTree:
    """A resolved step tree: a step's config and its children, recursively."""

    config: StepConfig
    children: tuple[tuple[str | None, StepTree], ...] = ()  # (mapper, child)

    def to_json(self) -> dict[str, Any]:
        """The nested form the API answers with and runs freeze as their snapshot."""
        c = self.config
        out: dict[str, Any] = {"id": c.id, "name": c.name, "kind": c.kind, "version": c.version}
        spec = c.spec
        match spec:
            case ChoiceSpec():  # each condition shows on its link, as `when`
                conditions = spec.conditions
                out["children"] = [{"mapper": m, "when": conditions[i] if i < len(conditions) else None,
                                    "step": child.to_json()} for i, (m, child) in enumerate(self.children)]
            case MapSpec():
                out.update(spec.to_json())
                out.pop("template", None)
                if self.children:
                    mapper, child = self.children[0]
                    out["child"] = {"mapper": mapper, "step": child.to_json()}
            case _:
                out.update(c.fields_json())
                if has_children(spec):
                    out["children"] = [{"mapper": m, "step": child.to_json()} for m, child in self.children]
        return out

    @functools.cached_property
    def snapshot_text(self) -> str:
        """`to_json()` as JSON text, encoded once per tree: a run freezes it, and one tree serves many starts."""
        return orjson.dumps(self.to_json()).decode()

    @staticmethod
    def from_json(data: Mapping[str, Any]) -> StepTree:
        """Rebuild a tree from its `to_json` form (a run's snapshot)."""
        links = data.get("children") or ([data["child"]] if data.get("child") else [])
        fields = dict(data)
        if data["kind"] == "choice":
            fields["conditions"] = [link.get("when") for link in links]
        config = StepConfig.from_json(data["name"], data["kind"], fields, id=data.get("id", ""),
                                      version=int(data.get("version", 0)))
        children = tuple((c.get("mapper"), StepTree.from_json(c["step"])) for c in links)
        return StepTree(config, children)

    @functools.cached_property
    def run_config(self) -> StepConfig:
        """The config its run nodes are frozen with: a map's carries its child's subtree, which it makes one
        copy of per item when it starts."""
        spec = self.config.spec
        if isinstance(spec, MapSpec) and self.children:
            return dataclasses.replace(self.config, spec=dataclasses.replace(spec, template=self.children[0]))
        return self.config

    @functools.cached_property
    def node_count(self) -> int:
        """How many run nodes a run of this tree has, counted once per shared subtree, without expanding it.

        A tree read from the store shares one StepTree per reused step, so this costs one addition per link
        however many nodes the links resolve to.
        """
        return 1 + sum(child.node_count for _, child in self.children)


class CycleError(ValueError):
    """A step tree would contain itself."""

    def __init__(self, path: Sequence[str]) -> None:
        self.path = list(path)
        super().__init__("a step tree may not contain itself: " + " → ".join(path))


class TreeTooBig(ValueError):
    """A step tree resolves to more run nodes than the limit allows."""

    def __init__(self, name: str, count: int, limit: int, *, changed: bool) -> None:
        self.name, self.count, self.limit = name, count, limit
        verb = "would resolve to" if changed else "resolves to"
        fix = "reuse fewer or smaller trees in it" if changed else "make it smaller"
        super().__init__(f"step tree '{name}' {verb} {count} nodes, counted through the trees it reuses, and a tree "
                         f"may resolve to at most {limit} (AETR_MAX_TREE_NODES): {fix}, or raise the limit")


def first_oversized(links: Mapping[str, Sequence[tuple[str | None, int]]], steps: Iterable[str],
                    limit: int) -> tuple[str, int] | None:
    """The first of `steps` whose tree resolves to more than `limit` nodes, and its count; None when all fit.

    `links` maps a step to its children, each with the number of links to it (None for a child without children
    of its own). Each step's size is computed once, children first, so a tree resolving to billions of nodes
    costs what its links cost; the first step found too big has no step of `steps` too big below it.
    """
    checked = set(steps)
    size: dict[str, int] = {}
    for top in sorted(checked):  # sorted: the same change is refused naming the same tree every time
        stack: list[tuple[str, bool]] = [(top, False)]
        while stack:  # iterative, like find_cycle: no recursion limit to mind
            step, expanded = stack.pop()
            if step in size:
                continue
            kids = links.get(step, ())
            if not expanded:
                stack.append((step, True))
                stack.extend((child, False) for child, _ in kids if child is not None and child not in size)
                continue
            size[step] = total = 1 + sum(n if child is None else n * size[child] for child, n in kids)
            if total > limit and step in checked:
                return step, total
    return None


def find_cycle(graph: Mapping[str, Sequence[str]], start: str) -> list[str] | None:
    """The path of names of a cycle reachable from `start` in a name→children graph, or None."""
    on_path: list[str] = []
    on_path_set: set[str] = set()
    done: set[str] = set()

    # Iterative DFS: trees can be deep enough to exhaust Python's recursion limit.
    stack: list[tuple[str, int]] = [(start, 0)]
    while stack:
        name, i = stack.pop()
        if i == 0:
            on_path.append(name)
            on_path_set.add(name)
        children = graph.get(name, ())
        if i < len(children):
            stack.append((name, i + 1))
            child = children[i]
            if child in on_path_set:
                return [*on_path[on_path.index(child):], child]
            if child not in done:
                stack.append((child, 0))
        else:
            on_path.pop()
            on_path_set.discard(name)
            done.add(name)
    return None


@dataclass(frozen=True)
class StepDef:
    """One step as written by a user: its config and its child links by name (inline children flattened)."""

    config: StepConfig
    links: tuple[Link, ...] = ()
