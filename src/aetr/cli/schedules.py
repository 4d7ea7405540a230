"""`aetr schedules …`, and the schedules `aetr apply` finds in step files (documents with `kind: schedule`)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Annotated, Any, Final

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from aetr.cli import render
from aetr.client import AetrConnectionError, AetrError, Client
from aetr.domain.steps import is_step_name

__all__ = ["SCHEDULE_KIND", "ScheduleFileError", "apply_schedules", "schedules_app", "schedules_table",
           "split_schedules"]

SCHEDULE_KIND: Final = "schedule"  # `kind: schedule` marks a schedule among a file's step definitions

schedules_app = typer.Typer(help="List, pause, resume and delete schedules (runs started by the clock).",
                            no_args_is_help=True)


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


def schedules_table(schedules: Iterable[dict[str, Any]]) -> Table:
    """Schedules: name, step, cron, zone, enabled, next run (UTC), and the state of the latest run."""
    table = Table(box=None, pad_edge=False)
    for column in ("name", "step", "cron", "tz", "enabled"):
        table.add_column(column, no_wrap=True)
    table.add_column("next run (UTC)", no_wrap=True)
    table.add_column("last run", no_wrap=True)
    for s in schedules:
        runs = s.get("last_runs") or []
        last = render.state(runs[0].get("state")) if runs else "-"
        table.add_row(*(escape(str(s.get(k, "?"))) for k in ("name", "step", "cron", "timezone")),
                      "yes" if s.get("enabled") else "[yellow]paused[/]", escape(_next(s)), last)
    return table


@schedules_app.command("list")
def schedules_list(
    ctx: typer.Context, as_json: Annotated[bool, typer.Option("--json", help="Print the raw JSON.")] = False
) -> None:
    """List every schedule with its next run and the state of its latest run."""
    from aetr.cli import main  # here, not at the top: main registers this module's commands

    schedules = main._api(ctx, lambda client: client.list_schedules())
    if as_json:
        main._print_json(schedules)
    elif not schedules:
        main.out.print("no schedules yet: add `kind: schedule` documents to a file for `aetr apply -f FILE`")
    else:
        main.out.print(schedules_table(schedules))


def _set_enabled(ctx: typer.Context, name: str, enabled: bool) -> None:
    from aetr.cli import main

    stored = main._api(ctx, lambda client: client.set_schedule_enabled(name, enabled))
    main.out.print(f"schedule {escape(name)}: {'resumed, next run ' + _next(stored) if enabled else 'paused'}")


@schedules_app.command("pause")
def schedules_pause(ctx: typer.Context, name: Annotated[str, typer.Argument(help="Schedule name.")]) -> None:
    """Pause a schedule: it starts no run until it is resumed."""
    _set_enabled(ctx, name, False)


@schedules_app.command("resume")
def schedules_resume(ctx: typer.Context, name: Annotated[str, typer.Argument(help="Schedule name.")]) -> None:
    """Resume a paused schedule from its next due time (the times it missed while paused are not run)."""
    _set_enabled(ctx, name, True)


@schedules_app.command("delete")
def schedules_delete(ctx: typer.Context, name: Annotated[str, typer.Argument(help="Schedule name.")]) -> None:
    """Delete a schedule (the runs it started are kept)."""
    from aetr.cli import main

    main._api(ctx, lambda client: client.delete_schedule(name))
    main.out.print(f"deleted schedule {escape(name)}")
