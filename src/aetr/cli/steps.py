"""`aetr apply` and `aetr steps ...`: step definition files, and the steps stored."""

from __future__ import annotations

import difflib
import sys
from pathlib import Path
from typing import Annotated, Any, Final

import orjson
import typer
import yaml
from rich.markup import escape

from aetr.cli import render, schedules
from aetr.cli.common import AsJson, Command, api, emit_table, err, fail, noun_app, out, print_json
from aetr.client import AetrConnectionError, AetrError, Applied, Client
from aetr.domain.steps import is_step_name

__all__ = ["StepFileError", "app", "apply", "load_step_definitions", "parse_step_definitions"]

app = noun_app("List, show and delete steps (create and change them with `aetr apply FILE`).")

StepArg = Annotated[str, typer.Argument(metavar="STEP", help="Step name.", show_default=False)]
# Fields of a resolved tree that say when and which, not what: a diff leaves them out.
NOT_DEFINITION: Final = frozenset({"id", "version", "created_at", "updated_at"})


# Step definition files


class StepFileError(ValueError):
    """A step definition file that cannot be applied: unreadable, not YAML/JSON, or not step definitions."""


def parse_step_definitions(text: str, source: str = "<input>") -> list[dict[str, Any]]:
    """The step definitions in a YAML or JSON text, in order: one mapping, a list, or a multi-document stream."""
    documents: list[Any]
    if source.endswith(".json"):
        try:
            documents = [orjson.loads(text)]
        except orjson.JSONDecodeError as exc:
            raise StepFileError(f"{source}: not valid JSON: {exc}") from None
    else:
        try:
            documents = list(yaml.safe_load_all(text))
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            raise StepFileError(f"{source}: not valid YAML: {exc.problem or exc.context}{where}") from None
        except yaml.YAMLError as exc:
            raise StepFileError(f"{source}: not valid YAML: {' '.join(str(exc).split())}") from None
    definitions: list[dict[str, Any]] = []
    multi = len(documents) > 1
    for number, document in enumerate(documents, start=1):
        if document is None:  # an empty document, e.g. after a trailing `---`
            continue
        where = f"{source}, document {number}" if multi else source
        entries = document if isinstance(document, list) else [document]
        for position, entry in enumerate(entries, start=1):
            at = f"{where}, item {position}" if isinstance(document, list) else where
            if not isinstance(entry, dict):
                raise StepFileError(
                    f"{at}: expected a step definition (a mapping with name and kind), got {type(entry).__name__}"
                )
            name = entry.get("name")
            if not isinstance(name, str) or not name:
                raise StepFileError(f'{at}: a step definition needs a "name" (a non-empty string)')
            if not is_step_name(name):
                # Checked before any step is applied: the name is also the URL's last segment, where '..' would
                # name another route.
                raise StepFileError(f"{at}: the name {name[:60]!r} must be 1–200 letters, digits, '-', '_' or '.', "
                                    "and not dots alone")
            definitions.append(entry)
    if not definitions:
        raise StepFileError(f"{source}: no step definitions found")
    return definitions


def load_step_definitions(path: str) -> list[dict[str, Any]]:
    """The step definitions in the file at `path` ('-' reads standard input)."""
    if path == "-":
        return parse_step_definitions(sys.stdin.read(), "<stdin>")
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise StepFileError(f"cannot read {path}: {exc.strerror if isinstance(exc, OSError) else exc}") from None
    return parse_step_definitions(text, path)


# apply


def _steps_of(tree: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every step of a resolved tree by name, each with only its own fields (its children by name)."""
    found: dict[str, dict[str, Any]] = {}
    stack = [tree]
    while stack:
        step = stack.pop()
        name = str(step.get("name"))
        if name in found:
            continue
        own = {k: v for k, v in step.items() if k not in NOT_DEFINITION}
        for field in ("children", "child"):
            links = own.get(field)
            if links is None:
                continue
            as_list = links if isinstance(links, list) else [links]
            named = []
            for link in as_list:
                child = link.get("step") if isinstance(link, dict) else None
                if isinstance(child, dict):
                    stack.append(child)
                    named.append({**link, "step": child.get("name")})
                else:
                    named.append(link)
            own[field] = named if isinstance(links, list) else named[0]
        found[name] = own
    return found


def _as_yaml(step: dict[str, Any] | None) -> list[str]:
    if step is None:
        return []
    return yaml.safe_dump(step, sort_keys=False, allow_unicode=True, width=100).splitlines(keepends=True)


def _diff(name: str, before: dict[str, Any] | None, after: dict[str, Any] | None) -> str:
    """A unified diff of one step's own definition, as stored and as it would be."""
    lines = difflib.unified_diff(_as_yaml(before), _as_yaml(after), fromfile=f"{name} (stored)",
                                 tofile=f"{name} (in the file)")
    return "".join(lines)


WOULD: Final = {"created": "would create", "changed": "would change"}
OUTCOME_STYLES: Final = {"created": "green", "changed": "cyan", "unchanged": "dim", "would create": "green",
                         "would change": "cyan"}


def _outcomes(applied: Applied, definition: dict[str, Any], dry_run: bool) -> list[tuple[str, str, Any]]:
    """(name, outcome, version) for the step defined and each inline child, in the order the server gave."""
    versions: dict[str, Any] = {}
    stack = [applied.step]
    while stack:
        step = stack.pop()
        versions.setdefault(str(step.get("name")), step.get("version"))
        links = step.get("children") or ([step["child"]] if isinstance(step.get("child"), dict) else [])
        stack.extend(link["step"] for link in links if isinstance(link, dict) and isinstance(link.get("step"), dict))
    said = applied.outcomes or {str(definition["name"]): "created" if applied.created else "changed"}
    return [(name, WOULD.get(outcome, outcome) if dry_run else outcome, versions.get(name, "?"))
            for name, outcome in said.items()]


def apply(
    ctx: typer.Context,
    file: Annotated[
        str | None,
        typer.Argument(metavar="FILE", help="YAML or JSON file: one step, a list, or a multi-document stream; "
                                            "'-' reads standard input.", show_default=False),
    ] = None,
    file_option: Annotated[
        str | None, typer.Option("-f", "--file", hidden=True, help="FILE, as an option.", show_default=False)
    ] = None,
    diff: Annotated[bool, typer.Option("--diff", help="Show what would change, and change nothing.")] = False,
    as_json: AsJson = False,
) -> None:
    """Create or change the steps, then the schedules (`kind: schedule`), defined in FILE.

    Steps go in file order; an unchanged step is left as it is."""
    if (file is None) == (file_option is None):
        fail("give the file of step definitions once: aetr apply FILE")
    source = file or file_option or ""
    try:
        definitions, schedule_defs = schedules.split_schedules(load_step_definitions(source), source)
    except (StepFileError, schedules.ScheduleFileError) as exc:
        fail(str(exc))

    async def work(client: Client) -> list[dict[str, Any]]:
        report: list[dict[str, Any]] = []
        for done, definition in enumerate(definitions):
            name = str(definition["name"])
            try:
                applied = await client.apply_step(definition, dry_run=diff)
                stored = await _stored(client, name) if diff else None
            except AetrConnectionError:
                raise
            except AetrError as exc:
                if done and not diff:
                    err.print(f"{done} of {len(definitions)} step(s) applied before {name!r} failed")
                # Name the step: the server's detail is about one PUT, the user gave a whole file.
                named = exc.detail if exc.detail.startswith(f"step {name!r}") else f"step {name!r}: {exc.detail}"
                raise AetrError(exc.status, named) from None
            before = _steps_of(stored) if stored else {}
            after = _steps_of(applied.step)
            for step, outcome, version in _outcomes(applied, definition, diff):
                entry: dict[str, Any] = {"step": step, "outcome": outcome, "version": version,
                                         "inline": step != name}
                if diff and outcome != "unchanged":
                    entry["diff"] = _diff(step, before.get(step), after.get(step))
                if not as_json:
                    _print_outcome(entry, len("would change") if diff else len("unchanged"))
                report.append(entry)
            if applied.unlisted and not as_json:
                out.print(f"  … and {applied.unlisted} more inline step(s) of {name!r}, not listed by the server")
        if diff:
            for schedule in schedule_defs:  # --diff compares steps; a schedule is only a PUT away
                err.print(f"schedule {schedule['name']!r}: not compared and not applied (--diff)")
        else:
            await schedules.apply_schedules(client, schedule_defs, err if as_json else out)
        return report

    report = api(ctx, work)
    if as_json:
        print_json(report)


async def _stored(client: Client, name: str) -> dict[str, Any] | None:
    """The stored tree of step `name`, or None when there is none yet."""
    try:
        return await client.get_step(name)
    except AetrError as exc:
        if exc.status == 404:
            return None
        raise


def _print_outcome(entry: dict[str, Any], width: int) -> None:
    """One line per step: what became of it (or would), its name, its version; then its diff, if any."""
    outcome = entry["outcome"]
    style = OUTCOME_STYLES.get(outcome, "")
    inline = "  [dim](inline)[/]" if entry["inline"] else ""
    out.print(f"[{style}]{escape(outcome):<{width}}[/]  [bold]{escape(entry['step'])}[/]  version "
              f"{escape(str(entry['version']))}{inline}", soft_wrap=True)
    if entry.get("diff"):
        for line in entry["diff"].splitlines():
            colour = "green" if line.startswith("+") else "red" if line.startswith("-") else "dim"
            out.print(f"    [{colour}]{escape(line)}[/]", soft_wrap=True)


# steps ...


@app.command("list", cls=Command)
def steps_list(ctx: typer.Context, as_json: AsJson = False) -> None:
    """List every step, sorted by name."""
    steps = api(ctx, lambda client: client.list_steps())
    if as_json:
        print_json(steps)
    elif not steps:
        err.print("no steps yet: create some with `aetr apply FILE`")
    else:
        emit_table(render.steps_table(steps))


@app.command("show", cls=Command)
def steps_show(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(metavar="STEP", help="Step name or id.", show_default=False)],
    as_json: AsJson = False,
) -> None:
    """Show a step's resolved tree."""
    step = api(ctx, lambda client: client.get_step(name))
    if as_json:
        print_json(step)
    else:
        out.print(render.step_tree(step))


@app.command("parents", cls=Command)
def steps_parents(ctx: typer.Context, name: StepArg, as_json: AsJson = False) -> None:
    """List the steps that use a step as a child."""
    parents = api(ctx, lambda client: client.step_parents(name))
    if as_json:
        print_json(parents)
        return
    if not parents:
        err.print(f"no step uses {escape(name)}")
    for parent in parents:
        sys.stdout.write(f"{parent.get('name', parent) if isinstance(parent, dict) else parent}\n")


@app.command("delete", cls=Command)
def steps_delete(ctx: typer.Context, name: StepArg) -> None:
    """Delete a step that no other step uses."""
    api(ctx, lambda client: client.delete_step(name))
    out.print(f"deleted step [bold]{escape(name)}[/]")
