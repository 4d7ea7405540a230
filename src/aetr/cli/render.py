"""Rich renderings of the API's JSON for the command line: run trees, step trees, tables."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

import orjson
from rich.markup import escape
from rich.table import Table
from rich.text import Text
from rich.tree import Tree

from aetr.client import TERMINAL_STATES
from aetr.domain.ids import node_tails, run_prefixes
from aetr.domain.urls import redact_userinfo

__all__ = [
    "Cell",
    "Column",
    "Rows",
    "drawn",
    "duration",
    "events_table",
    "one_line",
    "run_tree",
    "runs_table",
    "state",
    "step_tree",
    "steps_table",
    "tab_separated",
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


# Tables: drawn to the terminal's width, or tab-separated for pipes


@dataclass(frozen=True, slots=True)
class Column:
    """A table's column; `keep` ones (ids, states, times: what the next command or a reader needs whole) are
    never cut, the others share what width is left and end in an ellipsis when they must."""

    header: str
    keep: bool = False


@dataclass(frozen=True, slots=True)
class Cell:
    """One cell: its text, its Rich style on a terminal, and its text in tab-separated output when that
    differs (a whole time where the terminal shows the time of day)."""

    text: str
    style: str = ""
    plain: str | None = None


@dataclass(frozen=True, slots=True)
class Rows:
    """A table before it is drawn or written out."""

    columns: tuple[Column, ...]
    rows: list[tuple[Cell, ...]] = field(default_factory=list)


GAP: Final = 2  # spaces between two columns
MIN_CUT_WIDTH: Final = 6  # a cut column still shows this much


def _widths(table: Rows, width: int) -> list[int]:
    """Each column's width: kept columns whole, the others sharing the rest as evenly as their text allows."""
    natural = [max([len(c.header), *(len(row[i].text) for row in table.rows)]) for i, c in enumerate(table.columns)]
    flexible = sorted((i for i, c in enumerate(table.columns) if not c.keep), key=lambda i: natural[i])
    left = width - GAP * (len(natural) - 1) - sum(n for i, n in enumerate(natural) if i not in flexible)
    widths = list(natural)
    # Columns narrower than an even share of what is left keep their width; the others split the rest.
    while flexible:
        share = max(MIN_CUT_WIDTH, left // len(flexible))
        if natural[flexible[0]] <= share:
            left -= natural[flexible.pop(0)]
            continue
        for n, i in enumerate(flexible):
            widths[i] = max(MIN_CUT_WIDTH, share + (1 if n < left % len(flexible) else 0))
        break
    return widths


def drawn(table: Rows, width: int) -> Table:
    """`table` as a Rich table that fits in `width` columns: one line a row, cut text ending in '…'."""
    shown = Table(box=None, pad_edge=False, padding=(0, GAP, 0, 0), show_edge=False, header_style="bold")
    for column, size in zip(table.columns, _widths(table, width), strict=True):
        shown.add_column(column.header, width=size, no_wrap=True, overflow="fold" if column.keep else "ellipsis")
    for row in table.rows:
        shown.add_row(*(Text(cell.text, style=cell.style) for cell in row))
    return shown


def _field(text: str) -> str:
    return " ".join(text.replace("\t", " ").splitlines())


def tab_separated(table: Rows) -> str:
    """`table` as lines of tab-separated fields, a header line first (tabs and line breaks in a field become
    spaces)."""
    lines = ["\t".join(_field(c.header) for c in table.columns)]
    lines.extend("\t".join(_field(cell.text if cell.plain is None else cell.plain) for cell in row)
                 for row in table.rows)
    return "\n".join(lines) + "\n"


def _state_cell(value: Any) -> Cell:
    name = str(value or "?")
    return Cell(name, STATE_STYLES.get(name, ""))


def runs_table(runs: Iterable[dict[str, Any]]) -> Rows:
    """Root runs: the shortest start of each id that tells it from the others listed (with `--json`, whole
    ids), step, state, when created, how long."""
    runs = list(runs)
    prefixes = run_prefixes(str(run.get("id", "?")) for run in runs)
    table = Rows((Column("run", keep=True), Column("step"), Column("state", keep=True),
                  Column("created (UTC)", keep=True), Column("took", keep=True)))
    for run in runs:
        run_id = str(run.get("id", "?"))
        step = run.get("step")
        name = step.get("name") if isinstance(step, dict) else step
        table.rows.append((Cell(prefixes[run_id], "bold", plain=run_id), Cell(str(name or "?")),
                           _state_cell(run.get("state")), Cell(timestamp(run.get("created_at"))),
                           Cell(duration(run.get("started_at"), run.get("completed_at")))))
    return table


def steps_table(steps: Iterable[dict[str, Any]]) -> Rows:
    """Steps: name, kind, version, last change (ids are in `--json` and `steps show`)."""
    table = Rows((Column("name"), Column("kind", keep=True), Column("version", keep=True),
                  Column("updated (UTC)", keep=True)))
    for step in steps:
        table.rows.append((Cell(str(step.get("name", "?")), "bold"), Cell(str(step.get("kind", "?"))),
                           Cell(str(step.get("version", "?"))), Cell(timestamp(step.get("updated_at")))))
    return table


def _clock(value: Any) -> str:
    """The time of day of an ISO 8601 time, to the millisecond, in UTC."""
    parsed = _parse_time(value)
    return parsed.astimezone(UTC).strftime("%H:%M:%S.%f")[:-3] if parsed else "-"


def _attempt(data: dict[str, Any]) -> str:
    return f"attempt {data['attempt']}" if data.get("attempt") else ""


def _joined(*parts: Any) -> str:
    return ", ".join(str(p) for p in parts if p)


def _report(kind: str, data: dict[str, Any]) -> tuple[str, str]:
    """What a step's report was and what became of it: a callback, or the answer to a call."""
    attempt = _attempt(data)
    outcome = data.get("outcome")
    said = data.get("report")
    what = {"callback": "callback", "callback.fail": "failure callback", "callback.heartbeat": "heartbeat",
            "signal": "signal"}.get(kind, "call answered" if said == "output" else "call failed")
    if kind == "dispatch" and said == "failure":
        return "call failed", _joined(attempt, one_line(data.get("error") or "no message"))
    if outcome == "accepted":
        taken = {"output": "output taken", "failure": "failure taken"}.get(str(said), "taken")
        error = one_line(data["error"]) if kind != "dispatch" and data.get("error") else ""
        return what, _joined(taken, error, attempt)
    if outcome == "duplicate":
        return f"{what} ignored", _joined(attempt, "already taken")
    return f"{what} ignored", _joined(attempt, outcome, data.get("reason"))


def _event_words(kind: str, data: dict[str, Any]) -> tuple[str, str]:
    """(what happened, its detail) for one history line, in words."""
    match kind:
        case "run.started":
            return "run started", f"version {data['version']}" if data.get("version") else ""
        case "state":
            error = data.get("error")
            message = one_line(error.get("message", "")) if isinstance(error, dict) else ""
            kind_of = f"({error['kind']}) " if isinstance(error, dict) and error.get("kind") else ""
            # The state it left is the one the line before about that node entered: the one entered is news.
            return f"→ {data.get('to', '?')}", f"{kind_of}{message}".strip()
        case "dispatch" if "status" in data:
            took = f" in {data['ms']:g} ms" if isinstance(data.get("ms"), int | float) else ""
            return "called", _joined(f"HTTP {data['status']}{took}", _attempt(data))
        case "retry":
            delay = data.get("delay_s")
            later = f"attempt {data.get('next_attempt', '?')} in {delay:.2f} s" \
                if isinstance(delay, int | float) else ""
            return "will retry", _joined(_attempt(data), one_line(data.get("error") or ""), later)
        case "timeout":
            limit = (f"no heartbeat within {data['heartbeat_s']:g} s" if data.get("heartbeat_s") is not None
                     else f"no answer within {data.get('timeout_s', '?')} s")
            return "timed out", _joined(_attempt(data), limit)
        case "cancel":
            return "cancel asked", f"the run was {data.get('from', '?')}"
        case "run.retried":
            return "run retried", f"the run was {data.get('from', '?')}"
        case "item.failed":
            return "item failed", _joined(f"item {data.get('position', '?')} of {data.get('map', '?')}",
                                          "tolerated")
        case "dispatch" | "callback" | "callback.fail" | "callback.heartbeat" | "signal":
            return _report(kind, data)
    rest = {k: v for k, v in data.items() if k != "step"}
    return kind, one_line(rest) if rest else ""


def events_table(events: Sequence[dict[str, Any]], steps: dict[str, str] | None = None) -> Rows:
    """A run's history (`{at, kind, node_id, data}`) in the order it happened: time, node (the end of its id),
    its step, what happened and the detail. `steps` names the step of each node id, for events recorded before
    events named their step."""
    tails = node_tails(sorted({str(e["node_id"]) for e in events if e.get("node_id")}))
    table = Rows((Column("time (UTC)", keep=True), Column("node", keep=True), Column("step"),
                  Column("event", keep=True), Column("detail")))
    for event in events:
        data = _mapping(event.get("data"))
        node = event.get("node_id")
        step = data.get("step") or (steps or {}).get(str(node)) or "-"
        what, detail = _event_words(str(event.get("kind") or "?"), data)
        style = STATE_STYLES.get(str(data.get("to")), "") if event.get("kind") == "state" else ""
        table.rows.append((Cell(_clock(event.get("at")), "dim", plain=str(event.get("at") or "-")),
                           Cell(tails[str(node)] if node else "-", plain=str(node or "-")),
                           Cell(str(step), "bold"), Cell(what, style), Cell(detail)))
    return table
