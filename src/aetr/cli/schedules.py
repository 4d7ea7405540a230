"""`aetr schedules …`, and the schedules `aetr apply` finds in step files (documents with `kind: schedule`)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Annotated, Any, Final

import typer
from rich.console import Console
from rich.markup import escape

from aetr.cli import render
from aetr.cli.common import AsJson, Command, api, emit_table, err, noun_app, out, print_json
from aetr.client import AetrConnectionError, AetrError, Client
from aetr.domain.steps import is_step_name

__all__ = ["SCHEDULE_KIND", "ScheduleFileError", "apply_schedules", "schedules_app", "schedules_table",
           "split_schedules"]

SCHEDULE_KIND: Final = "schedule"  # `kind: schedule` marks a schedule among a file's step definitions

schedules_app = noun_app("List, pause, resume and delete schedules (runs started by the clock; create and change "
                         "them with `kind: schedule` documents in `aetr apply FILE`).")
ScheduleArg = Annotated[str, typer.Argument(metavar="SCHEDULE", help="Schedule name.", show_default=False)]


class ScheduleFileError(ValueError):
    """A schedule in a step file that cannot be applied."""


def split_schedules(definitions: list[dict[str, Any]], source: str) -> tuple[list[dict[str, Any]],
                                                                              list[dict[str, Any]]]:
    """A file's definitions as (steps, schedules): schedules are the mappings with `kind: schedule`, given as
    PUT /schedules/{name} takes them, with their `name` (and without `kind`)."""
    steps: list[dict[str, Any]] = []
    schedules: list[dict[str, Any]] = []
    for definition in definitions:
        if definition.get("kind") != SCHEDULE_KIND:
            steps.append(definition)
            continue
        name = definition.get("name")
        if not isinstance(name, str) or not is_step_name(name):
            raise ScheduleFileError(f"{source}: schedule {str(name)[:60]!r}: a schedule needs a \"name\" of 1–200 "
                                    "letters, digits, '-', '_' or '.'")
        schedules.append({k: v for k, v in definition.items() if k != "kind"})
    return steps, schedules


async def apply_schedules(client: Client, schedules: list[dict[str, Any]], out: Console) -> None:
    """PUT each schedule in file order (after the file's steps, which they may start), saying what it did."""
    for schedule in schedules:
        try:
            created, stored = await client.apply_schedule(schedule)
        except AetrConnectionError:
            raise
        except AetrError as exc:
            raise AetrError(exc.status, f"schedule {schedule['name']!r}: {exc.detail}") from None
        verb = "[green]created[/] " if created else "[cyan]replaced[/]"
        out.print(f"{verb} schedule [bold]{escape(str(schedule['name']))}[/]  next run "
                  f"{escape(_next(stored))}")


def _next(schedule: dict[str, Any]) -> str:
    if not schedule.get("enabled", True):
        return "paused"
    return render.timestamp(schedule.get("next_run_at"))


def schedules_table(schedules: Iterable[dict[str, Any]]) -> render.Rows:
    """Schedules: name, step, cron, zone, enabled, next run (UTC), and the state of the latest run."""
    table = render.Rows((render.Column("name"), render.Column("step"), render.Column("cron", keep=True),
                         render.Column("tz"), render.Column("enabled", keep=True),
                         render.Column("next run (UTC)", keep=True), render.Column("last run", keep=True)))
    for s in schedules:
        runs = s.get("last_runs") or []
        last = str(runs[0].get("state") or "?") if runs else "-"
        table.rows.append((render.Cell(str(s.get("name", "?")), "bold"), render.Cell(str(s.get("step", "?"))),
                           render.Cell(str(s.get("cron", "?"))), render.Cell(str(s.get("timezone", "?"))),
                           render.Cell("yes") if s.get("enabled") else render.Cell("paused", "yellow"),
                           render.Cell(_next(s)), render.Cell(last, render.STATE_STYLES.get(last, ""))))
    return table


@schedules_app.command("list", cls=Command)
def schedules_list(ctx: typer.Context, as_json: AsJson = False) -> None:
    """List every schedule with its next run and the state of its latest run."""
    schedules = api(ctx, lambda client: client.list_schedules())
    if as_json:
        print_json(schedules)
    elif not schedules:
        err.print("no schedules yet: add `kind: schedule` documents to a file for `aetr apply FILE`")
    else:
        emit_table(schedules_table(schedules))


def _set_enabled(ctx: typer.Context, name: str, enabled: bool, as_json: bool) -> None:
    stored = api(ctx, lambda client: client.set_schedule_enabled(name, enabled))
    if as_json:
        print_json(stored)
    else:
        out.print(f"schedule {escape(name)}: {'resumed, next run ' + _next(stored) if enabled else 'paused'}")


@schedules_app.command("pause", cls=Command)
def schedules_pause(ctx: typer.Context, name: ScheduleArg, as_json: AsJson = False) -> None:
    """Pause a schedule: it starts no run until it is resumed."""
    _set_enabled(ctx, name, False, as_json)


@schedules_app.command("resume", cls=Command)
def schedules_resume(ctx: typer.Context, name: ScheduleArg, as_json: AsJson = False) -> None:
    """Resume a paused schedule from its next due time (the times it missed while paused are not run)."""
    _set_enabled(ctx, name, True, as_json)


@schedules_app.command("delete", cls=Command)
def schedules_delete(ctx: typer.Context, name: ScheduleArg) -> None:
    """Delete a schedule (the runs it started are kept)."""
    api(ctx, lambda client: client.delete_schedule(name))
    out.print(f"deleted schedule {escape(name)}")
