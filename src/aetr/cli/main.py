"""The `aetr` command line: serve, migrate, apply step trees, start and inspect runs.

Each noun is a sub-app in its own module (`aetr.cli.runs`, `aetr.cli.steps`, `aetr.cli.schedules`), added below
with `add_typer`;
a new noun is a module with its `app = noun_app(...)` and one line here.
"""

from __future__ import annotations

import asyncio
from typing import Annotated

import typer

from aetr.cli import runs, schedules, steps
from aetr.cli.common import Command, Group, Settings, err, fail, out
from aetr.cli.steps import StepFileError, load_step_definitions, parse_step_definitions
from aetr.client import DEFAULT_URL

__all__ = ["StepFileError", "app", "load_step_definitions", "parse_step_definitions"]

app = typer.Typer(
    name="aetr",
    cls=Group,
    help=f"AETR: compose HTTP services into durable step trees.\n\n{runs.SHORT_IDS}",
    no_args_is_help=True,
    add_completion=False,
    # Locals may hold the API token: never print them.
    pretty_exceptions_show_locals=False,
)


@app.callback()
def main(
    ctx: typer.Context,
    url: Annotated[str, typer.Option("--url", metavar="URL", envvar="AETR_URL",
                                     help="Base URL of the AETR server.")] = DEFAULT_URL,
    token: Annotated[
        str | None, typer.Option("--token", metavar="TOKEN", envvar="AETR_API_TOKEN", help="API token (Bearer).",
                                 show_default=False)
    ] = None,
) -> None:
    """AETR: compose HTTP services into durable step trees."""
    ctx.obj = Settings(url=url, token=token or None)


# Commands: server and database


@app.command(cls=Command)
def serve(
    ctx: typer.Context,
    host: Annotated[
        str | None, typer.Option(metavar="HOST", help="Address to listen on (default AETR_HOST, or 127.0.0.1).",
                                 show_default=False)
    ] = None,
    port: Annotated[
        int | None,
        typer.Option(metavar="PORT", min=1, max=65535, help="Port to listen on (default AETR_PORT, or 9999).",
                     show_default=False),
    ] = None,
    insecure: Annotated[
        bool, typer.Option("--insecure", help="Allow a non-loopback address without an API token.")
    ] = False,
    database_url: Annotated[
        str | None,
        typer.Option(metavar="URL", help="Database URL (default AETR_DATABASE_URL, or the SQLite file ./aetr.db).",
                     show_default=False),
    ] = None,
    workers: Annotated[
        int | None,
        typer.Option(metavar="N", min=1, max=64, show_default=False,
                     help="Processes serving the port (default AETR_WORKERS, or 1): one core each."),
    ] = None,
) -> None:
    """Start the AETR server (brings the database schema up to date first)."""
    try:
        from aetr.api.server import serve as run_server
    except ModuleNotFoundError as exc:
        fail(f"cannot start the server: module {exc.name} is missing; reinstall aetr with its dependencies")
    # Options given here win over the environment; `aetr --token T serve` means the server's token is T.
    run_server(insecure=insecure, host=host, port=port, workers=workers, database_url=database_url,
               api_token=ctx.find_root().obj.token)


@app.command(cls=Command)
def migrate(
    database_url: Annotated[
        str | None,
        typer.Option(metavar="URL", help="Database URL (default AETR_DATABASE_URL, or the SQLite file ./aetr.db).",
                     show_default=False),
    ] = None,
) -> None:
    """Bring the database schema up to date."""
    try:
        from aetr.config import ConfigError
        from aetr.config import Settings as ServerSettings
        from aetr.store.migrate import SchemaTooNew, upgrade
    except ModuleNotFoundError as exc:
        fail(f"cannot migrate: module {exc.name} is missing; reinstall aetr with its dependencies")
    try:
        settings = ServerSettings.from_env(database_url=database_url)
        upgrade(settings.database_url)
    except (ConfigError, SchemaTooNew) as exc:
        fail(str(exc))
    out.print("database schema is up to date")


@app.command("example-services", cls=Command)
def example_services(
    host: Annotated[str, typer.Option(metavar="HOST", help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(metavar="PORT", min=1, max=65535, help="Port to listen on.")] = 8001,
) -> None:
    """Run the tutorial's example step services (ingest, normalize, images, metadata, index) until Ctrl-C."""
    from aetr.examples.services import run_example_services

    try:
        asyncio.run(run_example_services(host, port))
    except OSError as exc:
        fail(f"cannot listen on {host}:{port}: {exc.strerror or exc}")
    except KeyboardInterrupt:
        err.print("example step services stopped")


# Verbs at the top level, then one sub-app per noun.
app.command("apply", cls=Command)(steps.apply)
app.command("run", cls=Command)(runs.run)
app.add_typer(runs.app, name="runs")
app.add_typer(steps.app, name="steps")
app.add_typer(schedules.schedules_app, name="schedules")
