"""Rich renderings of the API's JSON for the command line: run trees, step trees, tables."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any, Final

import orjson
from rich.markup import escape
from rich.table import Table
from rich.tree import Tree

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
}
SUMMARY_CHARS: Final = 100


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


def _node_label(node: dict[str, Any]) -> str:
    step = _mapping(node.get("step"))
    parts = [
        f"[bold]{escape(str(step.get('name', '?')))}[/]",
        f"[dim]{escape(str(step.get('kind', '?')))}[/]",
        state(node.get("state")),
    ]
    if node.get("attempt"):
        parts.append(f"attempt {escape(str(node['attempt']))}")
    if took := duration(node.get("started_at"), node.get("completed_at")):
        parts.append(f"[dim]{took}[/]")
    error = node.get("error")
    if isinstance(error, dict) and error.get("message"):
        parts.append(f"[red]— {escape(one_line(error['message']))}[/]")
    return "  ".join(parts)


def run_tree(run: dict[str, Any]) -> Tree:
    """The run tree: step name, kind, state, attempt, duration and error of every node."""
    tree = Tree(_node_label(run))
    _add_run_children(tree, run)
    return tree


def _add_run_children(tree: Tree, node: dict[str, Any]) -> None:
    for child in node.get("children") or []:
        if isinstance(child, dict):
            _add_run_children(tree.add(_node_label(child)), child)


def _step_label(step: dict[str, Any], mapper: Any = None) -> str:
    parts = [f"[bold]{escape(str(step.get('name', '?')))}[/]", f"[dim]{escape(str(step.get('kind', '?')))}[/]"]
    if step.get("version") is not None:
        parts.append(f"[dim]v{escape(str(step['version']))}[/]")
    if step.get("kind") == "api":
        method = str(step.get("method") or "POST")
        url = redact_userinfo(str(step.get("url", "?")))  # a drawn tree ends up in terminals and pastes
        parts.append(escape(f"{method} {url} ({step.get('mode') or 'callback'})"))
    if step.get("kind") == "parallel":
        parts.append(f"reducer {escape(one_line(step.get('reducer') or 'array', 60))}")
    if mapper:
        parts.append(f"[cyan]mapper {escape(one_line(mapper, 60))}[/]")
    return "  ".join(parts)


def step_tree(step: dict[str, Any]) -> Tree:
    """The resolved step tree: name, kind, version, target of api steps, reducers and mappers."""
    tree = Tree(_step_label(step))
    _add_step_children(tree, step)
    return tree


def _add_step_children(tree: Tree, step: dict[str, Any]) -> None:
    for link in step.get("children") or []:
        if not isinstance(link, dict):
            continue
        child = link.get("step")
        if isinstance(child, dict):
            _add_step_children(tree.add(_step_label(child, link.get("mapper"))), child)
        else:
            tree.add(_step_label({"name": child, "kind": "?"}, link.get("mapper")))


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
