"""Rich renderings of the API's JSON for the command line: run trees, step trees, tables."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any, Final

import orjson
from rich.markup import escape
from rich.table import Table
from rich.tree import Tree

from aetr.client import TERMINAL_STATES
from aetr.domain.urls import redact_userinfo

__all__ = [
    "duration",
    "events_table",
    "one_line",
    "run_tree",
    "runs_table",
    "state",
    "step_tree",
    "steps_table",
    "timestamp",
]

STATE_STYLES: Final = {
    "pending": "dim",
    "executing": "yellow",
    "complete": "green",
    "error": "bold red",
    "cancelled": "magenta",
    "skipped": "dim",  # a choice's child not chosen: the whole line is dimmed
}
# The order a map's children are counted in, e.g. "3 complete · 1 error · 96 pending".
STATE_ORDER: Final = ("complete", "error", "cancelled", "executing", "pending", "skipped")
SUMMARY_CHARS: Final = 100
SCRIPT_CHARS: Final = 60  # a mapper, reducer, `when` or `items` script in a step tree
# A map with more children than this shows its first failed ones only, and a line for the rest.
MAP_CHILDREN_SHOWN: Final = 20
MAP_FAILURES_SHOWN: Final = 5


def one_line(value: Any, limit: int = SUMMARY_CHARS) -> str:
    """Compact JSON of `value`, cut to `limit` characters."""
    text = value if isinstance(value, str) else orjson.dumps(value).decode()
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def state(value: Any) -> str:
    """A state as Rich markup, coloured."""
    name = str(value or "?")
    return f"[{STATE_STYLES.get(name, 'white')}]{escape(name)}[/]"


def _parse_time(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def timestamp(value: Any) -> str:
    """An ISO 8601 time as `YYYY-MM-DD HH:MM:SS` in UTC, or '-'."""
    parsed = _parse_time(value)
    return parsed.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S") if parsed else "-"


def duration(started_at: Any, completed_at: Any, now: datetime | None = None) -> str:
    """How long a node ran (until now while it still runs), e.g. `850ms`, `12.3s`, `4m05s`; '' if unknown."""
    start = _parse_time(started_at)
    if start is None:
        return ""
    end = _parse_time(completed_at) or now or datetime.now(UTC)
    seconds = max(0.0, (end - start).total_seconds())
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def _mapping(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _node_label(node: dict[str, Any], item: int | None = None) -> str:
    step = _mapping(node.get("step"))
    parts = [
        f"[bold]{escape(str(step.get('name', '?')))}[/]",
        f"[dim]{escape(str(step.get('kind', '?')))}[/]",
        state(node.get("state")),
    ]
    if item is not None:
        parts.insert(0, f"[dim]item {item}[/]")
    if node.get("attempt"):
        parts.append(f"attempt {escape(str(node['attempt']))}")
    if took := duration(node.get("started_at"), node.get("completed_at")):
        parts.append(f"[dim]{took}[/]")
    if node.get("awaits_signal"):
        # The id is what `aetr runs signal RUN NODE` needs: printed whole, to be copied.
        parts.append(f"[yellow]awaiting signal[/] [dim]node[/] {escape(str(node.get('id', '?')))}")
    elif node.get("wait_until") and node.get("state") not in TERMINAL_STATES:
        parts.append(f"[yellow]waits until {timestamp(node['wait_until'])} UTC[/]")
    if step.get("kind") == "map":
        parts.append(state_counts(_children(node)))
    error = node.get("error")
    if isinstance(error, dict) and error.get("message"):
        parts.append(f"[red]— {escape(one_line(error['message']))}[/]")
    label = "  ".join(parts)
    return f"[dim]{label}[/dim]" if node.get("state") == "skipped" else label


def _children(node: dict[str, Any]) -> list[dict[str, Any]]:
    return [child for child in node.get("children") or [] if isinstance(child, dict)]


def state_counts(nodes: Iterable[dict[str, Any]]) -> str:
    """How many of `nodes` are in each state, coloured, e.g. `3 complete · 1 error · 96 pending`."""
    counts = Counter(str(node.get("state") or "?") for node in nodes)
    if not counts:
        return "[dim]no items[/]"
    order = [s for s in STATE_ORDER if s in counts] + sorted(s for s in counts if s not in STATE_ORDER)
    return " · ".join(f"{counts[name]} {state(name)}" for name in order)


def run_tree(run: dict[str, Any]) -> Tree:
    """The run tree: step name, kind, state, attempt, duration and error of every node; what a wait waits for;
    how many of a map's items are in each state (a big map shows only its first failed items)."""
    tree = Tree(_node_label(run))
    _add_run_children(tree, run)
    return tree


def _add_run_children(tree: Tree, node: dict[str, Any]) -> None:
    children = _children(node)
    if _mapping(node.get("step")).get("kind") != "map":
        for child in children:
            _add_run_children(tree.add(_node_label(child)), child)
        return
    shown: Sequence[int] = range(len(children))
    if len(children) > MAP_CHILDREN_SHOWN:
        # A map may have thousands of items: the failed ones are what a person looks for.
        shown = [i for i, child in enumerate(children) if child.get("state") == "error"][:MAP_FAILURES_SHOWN]
    for index in shown:
        child = children[index]
        _add_run_children(tree.add(_node_label(child, _position(child, index))), child)
    if hidden := len(children) - len(shown):
        which = f", only the first {len(shown)} failed" if shown else ""
        run_id = escape(str(node.get("root_id") or node.get("id") or "ID"))
        tree.add(f"[dim]… {hidden} of {len(children)} items not shown{which}; all: aetr runs show {run_id} --json[/]")


def _position(node: dict[str, Any], index: int) -> int:
    position = node.get("position")
    return position if isinstance(position, int) else index


def _script(value: Any) -> str:
    return escape(one_line(value, SCRIPT_CHARS))


def _step_fields(step: dict[str, Any]) -> list[str]:
    """The fields of a step's kind worth a glance, as Rich markup."""
    kind = step.get("kind")
    parts = []
    if kind == "api":
        method = str(step.get("method") or "POST")
        url = redact_userinfo(str(step.get("url", "?")))  # a drawn tree ends up in terminals and pastes
        parts.append(escape(f"{method} {url} ({step.get('mode') or 'callback'})"))
    if kind == "map":
        parts.append(f"items {_script(step['items'])}" if step.get("items") else "items = input")
    if kind in ("api", "map") and step.get("max_concurrency") is not None:
        parts.append(f"max_concurrency {escape(str(step['max_concurrency']))}")
    if kind == "map":
        parts.append(f"tolerated_failures {escape(str(step.get('tolerated_failures', 0)))}")
    if kind in ("parallel", "map"):
        parts.append(f"reducer {_script(step.get('reducer') or 'array')}")
    if kind == "wait":
        if step.get("signal"):
            timeout = step.get("timeout_s")
            parts.append("signal" + (f", timeout {escape(_seconds(timeout))}" if timeout is not None else ""))
        elif step.get("until") is not None:
            parts.append(f"until {_script(step['until'])}")
        elif step.get("seconds") is not None:
            parts.append(f"{escape(_seconds(step['seconds']))}")
    return parts


def _seconds(value: Any) -> str:
    return f"{value:g}s" if isinstance(value, int | float) else str(value)


def _step_label(step: dict[str, Any], link: dict[str, Any] | None = None, choice: bool = False) -> str:
    parts = [f"[bold]{escape(str(step.get('name', '?')))}[/]", f"[dim]{escape(str(step.get('kind', '?')))}[/]"]
    if step.get("version") is not None:
        parts.append(f"[dim]v{escape(str(step['version']))}[/]")
    parts.extend(_step_fields(step))
    if link and link.get("mapper"):
        parts.append(f"[cyan]mapper {_script(link['mapper'])}[/]")
    if choice:  # a choice's link: the condition that picks it, or the default
        when = (link or {}).get("when")
        parts.append(f"[yellow]when {_script(when)}[/]" if when is not None else "[yellow]otherwise[/]")
    return "  ".join(parts)


def step_tree(step: dict[str, Any]) -> Tree:
    """The resolved step tree: name, kind, version and each kind's fields (an api step's target, a map's items
    and limits, a wait's end), reducers, mappers, and a choice's conditions."""
    tree = Tree(_step_label(step))
    _add_step_children(tree, step)
    return tree


def _add_step_children(tree: Tree, step: dict[str, Any]) -> None:
    links = step.get("children") or []
    if step.get("kind") == "map" and isinstance(step.get("child"), dict):
        links = [step["child"]]
    choice = step.get("kind") == "choice"
    for link in links:
        if not isinstance(link, dict):
            continue
        child = link.get("step")
        if isinstance(child, dict):
            _add_step_children(tree.add(_step_label(child, link, choice)), child)
        else:
            tree.add(_step_label({"name": child, "kind": "?"}, link, choice))


def _fit(values: list[str], cap: int = 40) -> int:
    """The width that shows the longest of `values` whole, up to `cap`."""
    return min(cap, max((len(v) for v in values), default=0))


def runs_table(runs: Iterable[dict[str, Any]]) -> Table:
    """Root runs: id, step, state, when created, how long."""
    rows = []
    for run in runs:
        step = run.get("step")
        name = step.get("name") if isinstance(step, dict) else step
        rows.append(
            (
                str(run.get("id", "?")),
                str(name or "?"),
                run.get("state"),
                timestamp(run.get("created_at")),
                duration(run.get("started_at"), run.get("completed_at")),
            )
        )
    table = Table(box=None, pad_edge=False)
    # Ids and names are copied into the next command: never cut them, let the other columns give way.
    table.add_column("id", no_wrap=True, min_width=_fit([r[0] for r in rows]))
    table.add_column("step", no_wrap=True, min_width=_fit([r[1] for r in rows]))
    table.add_column("state", no_wrap=True, min_width=9)  # "executing", "cancelled"
    table.add_column("created (UTC)")
    table.add_column("duration", no_wrap=True)
    for run_id, name, run_state, created, took in rows:
        table.add_row(escape(run_id), escape(name), state(run_state), created, took)
    return table


def steps_table(steps: Iterable[dict[str, Any]]) -> Table:
    """Steps: name, kind, version, last change (ids are in `--json` and `steps show`)."""
    rows = [
        (
            str(step.get("name", "?")),
            str(step.get("kind", "?")),
            str(step.get("version", "?")),
            timestamp(step.get("updated_at")),
        )
        for step in steps
    ]
    table = Table(box=None, pad_edge=False)
    table.add_column("name", no_wrap=True, min_width=_fit([r[0] for r in rows]))
    table.add_column("kind", no_wrap=True)
    table.add_column("version", no_wrap=True)
    table.add_column("updated (UTC)")
    for row in rows:
        table.add_row(*(escape(cell) for cell in row))
    return table


def events_table(events: Iterable[dict[str, Any]]) -> Table:
    """A run's events (`{at, kind, node_id, data}`), oldest first."""
    table = Table("time (UTC)", "event", "node", "detail", box=None, pad_edge=False)
    for event in events:
        node = event.get("node_id")
        data = event.get("data")
        table.add_row(
            timestamp(event.get("at")),
            escape(str(event.get("kind") or "?")),
            escape(str(node)[:8] if node else "-"),
            escape(one_line(data)) if data else "",
        )
    return table
