"""The `aetr` command line: serve, migrate, apply step trees, start and inspect runs."""

from __future__ import annotations

import asyncio
import math
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Final, NoReturn, TypeVar

import orjson
import typer
import yaml
from rich.console import Console
from rich.markup import escape

from aetr.cli import render, schedules
from aetr.client import DEFAULT_URL, AetrConnectionError, AetrError, Client
from aetr.domain.steps import is_step_name

__all__ = ["StepFileError", "app", "load_step_definitions", "parse_step_definitions"]

T = TypeVar("T")

EXIT_OK: Final = 0
EXIT_RUN_FAILED: Final = 1  # the run ended in error or cancelled, or is still going when --timeout passed
EXIT_USAGE: Final = 2  # a bad command line, or an error answered by (or reaching) the API
EXIT_INTERRUPTED: Final = 130  # the shell's convention for Ctrl-C

out = Console(highlight=False)
# soft_wrap: an error message stays on one line, whatever the terminal width, so it can be grepped.
err = Console(stderr=True, highlight=False, soft_wrap=True)

app = typer.Typer(
    name="aetr",
    help="AETR: compose HTTP services into durable step trees.",
    no_args_is_help=True,
    add_completion=False,
    # Locals may hold the API token: never print them.
    pretty_exceptions_show_locals=False,
)
runs_app = typer.Typer(help="Inspect, cancel and retry runs, and answer their signal waits.", no_args_is_help=True)
steps_app = typer.Typer(help="List, show and delete steps.", no_args_is_help=True)
app.add_typer(runs_app, name="runs")
app.add_typer(steps_app, name="steps")
app.add_typer(schedules.schedules_app, name="schedules")


@dataclass(frozen=True, slots=True)
class Settings:
    """Where the API is and how to authenticate, from the global options."""

    url: str
    token: str | None


@app.callback()
def main(
    ctx: typer.Context,
    url: Annotated[str, typer.Option("--url", envvar="AETR_URL", help="Base URL of the AETR server.")] = DEFAULT_URL,
    token: Annotated[
        str | None, typer.Option("--token", envvar="AETR_API_TOKEN", help="API token (Bearer).", show_default=False)
    ] = None,
) -> None:
    """AETR: compose HTTP services into durable step trees."""
    ctx.obj = Settings(url=url, token=token or None)


# Helpers


def _fail(message: str, code: int = EXIT_USAGE) -> NoReturn:
    err.print(f"[red]error:[/] {escape(message)}")
    raise typer.Exit(code)


def _explain(exc: AetrError) -> str:
    """One line for an API error, with the fix when there is an obvious one."""
    if isinstance(exc, AetrConnectionError):
        return exc.detail
    if exc.status == 401:
        return f"{exc.detail} (HTTP 401): pass --token or set AETR_API_TOKEN"
    return f"{exc.detail} (HTTP {exc.status})"


def _api(ctx: typer.Context, work: Callable[[Client], Awaitable[T]]) -> T:
    """Run `work` with a client for the configured server; API errors end the command with exit code 2."""
    settings: Settings = ctx.find_root().obj

    async def go() -> T:
        async with Client(settings.url, settings.token) as client:
            return await work(client)

    try:
        return asyncio.run(go())
    except AetrError as exc:
        _fail(_explain(exc))
    except KeyboardInterrupt:
        err.print("interrupted")
        raise typer.Exit(EXIT_INTERRUPTED) from None


def _print_json(value: Any) -> None:
    # Plain stdout, not Rich: the output is for pipes and `jq`, so no wrapping and no markup.
    sys.stdout.write(orjson.dumps(value, option=orjson.OPT_INDENT_2).decode() + "\n")


def _items(page: dict[str, Any]) -> list[dict[str, Any]]:
    """The runs of a `GET /runs` page (`{runs, next_cursor}`)."""
    runs = page.get("runs")
    return runs if isinstance(runs, list) else []


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


# Commands: server and database


@app.command()
def serve(
    ctx: typer.Context,
    host: Annotated[
        str | None, typer.Option(help="Address to listen on (default AETR_HOST, or 127.0.0.1).", show_default=False)
    ] = None,
    port: Annotated[
        int | None,
        typer.Option(min=1, max=65535, help="Port to listen on (default AETR_PORT, or 9999).", show_default=False),
    ] = None,
    insecure: Annotated[
        bool, typer.Option("--insecure", help="Allow a non-loopback address without an API token.")
    ] = False,
    database_url: Annotated[
        str | None,
        typer.Option(help="Database URL (default AETR_DATABASE_URL, or the SQLite file ./aetr.db).",
                     show_default=False),
    ] = None,
    workers: Annotated[
        int | None,
        typer.Option(min=1, max=64, help="Processes serving the port (default AETR_WORKERS, or 1): one core each.",
                     show_default=False),
    ] = None,
) -> None:
    """Start the AETR server (brings the database schema up to date first)."""
    try:
        from aetr.api.server import serve as run_server
    except ModuleNotFoundError as exc:
        _fail(f"cannot start the server: module {exc.name} is missing; reinstall aetr with its dependencies")
    # Options given here win over the environment; `aetr --token T serve` means the server's token is T.
    run_server(insecure=insecure, host=host, port=port, workers=workers, database_url=database_url,
               api_token=ctx.find_root().obj.token)


@app.command()
def migrate(
    database_url: Annotated[
        str | None,
        typer.Option(help="Database URL (default AETR_DATABASE_URL, or the SQLite file ./aetr.db).",
                     show_default=False),
    ] = None,
) -> None:
    """Bring the database schema up to date."""
    try:
        from aetr.config import ConfigError, Settings
        from aetr.store.migrate import upgrade
    except ModuleNotFoundError as exc:
        _fail(f"cannot migrate: module {exc.name} is missing; reinstall aetr with its dependencies")
    try:
        settings = Settings.from_env(database_url=database_url)
    except ConfigError as exc:
        _fail(str(exc))
    upgrade(settings.database_url)
    out.print("database schema is up to date")


@app.command("example-services")
def example_services(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port to listen on.")] = 8001,
) -> None:
    """Run the tutorial's example step services (ingest, normalize, images, metadata, index) until Ctrl-C."""
    from aetr.examples.services import run_example_services

    try:
        asyncio.run(run_example_services(host, port))
    except OSError as exc:
        _fail(f"cannot listen on {host}:{port}: {exc.strerror or exc}")
    except KeyboardInterrupt:
        err.print("example step services stopped")


# Commands: steps


@app.command()
def apply(
    ctx: typer.Context,
    file: Annotated[
        str,
        typer.Option(
            "-f", "--file", help="YAML or JSON file: one step, a list, or a multi-document stream; '-' = stdin."
        ),
    ],
) -> None:
    """Create or replace the steps defined in a file, in file order, then its schedules (`kind: schedule`)."""
    try:
        definitions, schedule_defs = schedules.split_schedules(load_step_definitions(file), file)
    except (StepFileError, schedules.ScheduleFileError) as exc:
        _fail(str(exc))

    async def work(client: Client) -> None:
        for done, definition in enumerate(definitions):
            try:
                applied = await client.apply_step(definition)
            except AetrConnectionError:
                raise
            except AetrError as exc:
                if done:
                    err.print(f"{done} of {len(definitions)} step(s) applied before {definition['name']!r} failed")
                # Name the step: the server's detail is about one PUT, the user gave a whole file.
                raise AetrError(exc.status, f"step {definition['name']!r}: {exc.detail}") from None
            verb = "[green]created[/] " if applied.created else "[cyan]replaced[/]"
            version = applied.step.get("version", "?")
            out.print(f"{verb} [bold]{escape(str(definition['name']))}[/]  version {escape(str(version))}")
        await schedules.apply_schedules(client, schedule_defs, out)

    _api(ctx, work)


@steps_app.command("list")
def steps_list(
    ctx: typer.Context, as_json: Annotated[bool, typer.Option("--json", help="Print the raw JSON.")] = False
) -> None:
    """List every step, sorted by name."""
    steps = _api(ctx, lambda client: client.list_steps())
    if as_json:
        _print_json(steps)
    elif not steps:
        out.print("no steps yet: create some with `aetr apply -f FILE`")
    else:
        out.print(render.steps_table(steps))


@steps_app.command("show")
def steps_show(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Step name or id.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the raw JSON.")] = False,
) -> None:
    """Show a step's resolved tree."""
    step = _api(ctx, lambda client: client.get_step(name))
    if as_json:
        _print_json(step)
    else:
        out.print(render.step_tree(step))


@steps_app.command("parents")
def steps_parents(ctx: typer.Context, name: Annotated[str, typer.Argument(help="Step name.")]) -> None:
    """List the steps that use a step as a child."""
    parents = _api(ctx, lambda client: client.step_parents(name))
    if not parents:
        out.print(f"no step uses {escape(name)}")
    for parent in parents:
        out.print(escape(str(parent.get("name", parent)) if isinstance(parent, dict) else str(parent)))


@steps_app.command("delete")
def steps_delete(ctx: typer.Context, name: Annotated[str, typer.Argument(help="Step name.")]) -> None:
    """Delete a step that no other step uses."""
    _api(ctx, lambda client: client.delete_step(name))
    out.print(f"deleted step [bold]{escape(name)}[/]")


# Commands: runs


def _read_file(option: str, path: str) -> str:
    """The text of the file an option names; '-' is standard input."""
    try:
        return sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        _fail(f"cannot read {option} {path}: {exc.strerror if isinstance(exc, OSError) else exc}")


def _parse_json(text: str, origin: str, example: str) -> Any:
    """`text` as JSON, or a usage error naming where it came from and how it should look."""
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        _fail(f"{origin} is not valid JSON ({exc}); e.g. {example}")


def _run_input(input: str | None, input_file: str | None) -> Any:
    """The run input from --input or --input-file (JSON); `{}` when neither is given."""
    if input is not None and input_file is not None:
        _fail("give --input or --input-file, not both")
    if input_file is not None:
        text, origin = _read_file("--input-file", input_file), f"--input-file {input_file}"
    elif input is not None:
        text, origin = input, "--input"
    else:
        return {}
    return _parse_json(text, origin, """--input '{"source": "acme"}'""")


def _run_failure(run: dict[str, Any]) -> str:
    """One line saying how a run ended in error or was cancelled, and where."""
    found = run.get("error")
    error: dict[str, Any] = found if isinstance(found, dict) else {}
    where = f" at step {error['step']}" if error.get("step") else ""
    kind = f" ({error['kind']})" if error.get("kind") else ""
    message = error.get("message") or "no message"
    if run.get("state") == "cancelled":
        return f"run {run.get('id')} was cancelled{where}: {message}" if error else f"run {run.get('id')} was cancelled"
    return f"run {run.get('id')} ended in error{where}{kind}: {message}"


@app.command()
def run(
    ctx: typer.Context,
    step: Annotated[str, typer.Argument(help="Step name or id.")],
    input: Annotated[
        str | None, typer.Option("--input", help='Run input as JSON, e.g. \'{"source": "acme"}\'. Default {}.')
    ] = None,
    input_file: Annotated[str | None, typer.Option(help="Read the run input (JSON) from a file; '-' = stdin.")] = None,
    wait: Annotated[bool, typer.Option("--wait", help="Wait for the end and print the output as JSON.")] = False,
    timeout: Annotated[
        float | None,
        typer.Option(
            min=0, help="With --wait: give up waiting after this many seconds (implies --wait).", show_default=False
        ),
    ] = None,
    idempotency_key: Annotated[
        str | None, typer.Option(help="Starting twice with the same key gives the same run.", show_default=False)
    ] = None,
    notify: Annotated[
        str | None,
        typer.Option(help="POST a CloudEvent to this http(s) URL when the run ends (retried until it answers 2xx).",
                     show_default=False),
    ] = None,
) -> None:
    """Start a run; print its id, or with --wait its output (exit 1 if it ends in error or cancelled)."""
    value = _run_input(input, input_file)
    waiting = wait or timeout is not None

    async def work(client: Client) -> dict[str, Any]:
        started = await client.start_run(step, value, idempotency_key=idempotency_key, notify=notify)
        if not waiting:
            return started
        run_id = str(started["id"])
        err.print(f"[dim]run {escape(run_id)} started; waiting[/]")
        try:
            return await client.wait_run(run_id, math.inf if timeout is None else timeout)
        except TimeoutError:
            _fail(
                f"run {run_id} is not finished after {timeout}s; it goes on: follow it with `aetr runs show {run_id}`",
                EXIT_RUN_FAILED,
            )

    result = _api(ctx, work)
    if not waiting:
        sys.stdout.write(f"{result['id']}\n")
    elif result.get("state") == "complete":
        _print_json(result.get("output"))
    else:
        _fail(_run_failure(result), EXIT_RUN_FAILED)


@runs_app.command("list")
def runs_list(
    ctx: typer.Context,
    state: Annotated[str | None, typer.Option(help="Only runs in this state.", show_default=False)] = None,
    step: Annotated[str | None, typer.Option(help="Only runs of this step.", show_default=False)] = None,
    limit: Annotated[int | None, typer.Option(min=1, help="At most this many runs.", show_default=False)] = None,
    cursor: Annotated[str | None, typer.Option(help="Page cursor from a previous list.", show_default=False)] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the raw JSON page.")] = False,
) -> None:
    """List root runs, newest first."""
    page = _api(ctx, lambda client: client.list_runs(state=state, step=step, limit=limit, cursor=cursor))
    if as_json:
        _print_json(page)
        return
    runs = _items(page)
    if not runs:
        out.print("no runs")
    else:
        out.print(render.runs_table(runs))
    next_cursor = page.get("next_cursor")
    if next_cursor:
        out.print(f"[dim]more: aetr runs list --cursor {escape(str(next_cursor))}[/]")


@runs_app.command("show")
def runs_show(
    ctx: typer.Context,
    run_id: Annotated[str, typer.Argument(metavar="ID", help="Run id (or the id of any of its nodes).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the raw JSON.")] = False,
) -> None:
    """Show a run tree: each node's step, kind, state, attempt and duration."""
    _print_run(_api(ctx, lambda client: client.get_run(run_id)), as_json)


def _print_run(found: dict[str, Any], as_json: bool) -> None:
    """A run tree as `runs show` prints it: the tree, then its output or how it failed; or the raw JSON."""
    if as_json:
        _print_json(found)
        return
    out.print(render.run_tree(found))
    if found.get("state") == "complete":
        # One line, cut to the terminal: `--json` has the whole output.
        summary = render.one_line(found.get("output"), max(40, out.width - len("output ")))
        out.print(f"[green]output[/] {escape(summary)}", soft_wrap=True)
    elif found.get("state") in {"error", "cancelled"}:
        out.print(f"[red]{escape(_run_failure(found))}[/]")


@runs_app.command("events")
def runs_events(
    ctx: typer.Context,
    run_id: Annotated[str, typer.Argument(metavar="ID", help="Run id.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the raw JSON.")] = False,
) -> None:
    """Show a run's history, oldest first."""
    events = _api(ctx, lambda client: client.run_events(run_id))
    if as_json:
        _print_json(events)
    else:
        out.print(render.events_table(events))


@runs_app.command("cancel")
def runs_cancel(ctx: typer.Context, run_id: Annotated[str, typer.Argument(metavar="ID", help="Run id.")]) -> None:
    """Cancel every node of a run that has not finished."""
    found = _api(ctx, lambda client: client.cancel_run(run_id))
    out.print(f"run {escape(run_id)}: {render.state(found.get('state'))}")


@runs_app.command("retry")
def runs_retry(ctx: typer.Context, run_id: Annotated[str, typer.Argument(metavar="ID", help="Run id.")]) -> None:
    """Run the failed and cancelled nodes of a run again (complete nodes are kept)."""
    found = _api(ctx, lambda client: client.retry_run(run_id))
    out.print(f"run {escape(run_id)}: {render.state(found.get('state'))}")


SIGNAL_ANSWERS: Final = "--output, --output-file or --error"


@runs_app.command("signal")
def runs_signal(
    ctx: typer.Context,
    run_id: Annotated[str, typer.Argument(metavar="RUN", help="Run id.")],
    node_id: Annotated[
        str, typer.Argument(metavar="NODE", help="Id of the wait's node (`runs show` prints it while it waits).")
    ],
    output: Annotated[
        str | None,
        typer.Option(help='Complete the wait with this output (JSON), e.g. \'{"approved": true}\'.',
                     show_default=False),
    ] = None,
    output_file: Annotated[
        str | None, typer.Option(help="Complete the wait with the output (JSON) in a file; '-' = stdin.",
                                 show_default=False)
    ] = None,
    error: Annotated[
        str | None, typer.Option(help="Fail the wait with this message (error kind signal).", show_default=False)
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the raw JSON of the run.")] = False,
) -> None:
    """Answer a signal wait: complete it with an output, or fail it; then show the run tree."""
    given = [name for name, value in (("--output", output), ("--output-file", output_file), ("--error", error))
             if value is not None]
    if not given:
        _fail(f"give one of {SIGNAL_ANSWERS}: the output to complete the wait with, or the message to fail it")
    if len(given) > 1:
        _fail(f"give only one of {SIGNAL_ANSWERS}, not {' and '.join(given)}")
    example = """--output '{"approved": true}'"""
    if error is not None:
        if not error.strip():
            _fail("--error needs a message saying why the wait fails")
        found = _api(ctx, lambda client: client.signal(run_id, node_id, error=error))
    else:
        if output_file is not None:
            value = _parse_json(_read_file("--output-file", output_file), f"--output-file {output_file}", example)
        else:
            value = _parse_json(output or "", "--output", example)
        found = _api(ctx, lambda client: client.signal(run_id, node_id, output=value))
    _print_run(found, as_json)
