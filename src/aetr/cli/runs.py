"""`aetr run` and `aetr runs ...`: start runs, follow them, act on them; ids taken whole or by their start."""

from __future__ import annotations

import math
import re
import sys
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any, Final

import orjson
import typer
from rich.markup import escape

from aetr.cli import render
from aetr.cli.common import EXIT_RUN_FAILED, AsJson, Command, api, emit_table, err, fail, noun_app, out, print_json
from aetr.client import AetrError, Client
from aetr.domain.ids import MIN_PREFIX_DIGITS, normal_prefix

__all__ = ["SHORT_IDS", "app", "resolve_node", "resolve_run", "run"]

SHORT_IDS: Final = (
    "Short ids: a run is shown by the start of its id, as much of it as tells it from the other runs listed; "
    "a node by the end of its id (a run's nodes share the start of theirs). Wherever a RUN is asked for, any "
    f"start of its id ({MIN_PREFIX_DIGITS} hex digits or more, hyphens optional) that only one run has will do; "
    "a NODE may be given by the start or the end of its id, as `runs events` shows it."
)
CANDIDATES_SHOWN: Final = 10  # runs (or nodes) listed when a short id matches several

app = noun_app(f"Inspect, cancel, retry and delete runs, and answer their signal waits.\n\n{SHORT_IDS}")

RunArg = Annotated[str, typer.Argument(
    metavar="RUN", help="Run id, or its start (see Short ids in `aetr runs --help`).", show_default=False)]


# Short ids


def _is_whole_id(text: str) -> bool:
    try:
        return str(uuid.UUID(text)) == text.lower() and len(text) == 36
    except ValueError:
        return False


async def resolve_run(client: Client, text: str) -> str:
    """The id of the one run whose id is `text` or starts with it; ends the command saying why otherwise."""
    text = text.strip()
    if _is_whole_id(text):
        return text.lower()  # a node's id also names its run: the server knows
    prefix = normal_prefix(text)
    if prefix is None:
        fail(f"{text!r} is not a run id or the start of one: give at least {MIN_PREFIX_DIGITS} of its hex digits "
             "(0-9, a-f), as `aetr runs list` shows them")
    page = await client.list_runs(id_prefix=prefix, limit=CANDIDATES_SHOWN)
    runs = [r for r in page.get("runs") or [] if isinstance(r, dict)]
    if not runs:
        fail(f"no run's id starts with {text}: `aetr runs list` shows the runs there are")
    if len(runs) > 1:
        more = " or more" if page.get("next_cursor") else ""
        lines = [f"{text} is the start of {len(runs)}{more} runs' ids; give more of the one you mean:"]
        for r in runs:
            step = r.get("step")
            name = step.get("name") if isinstance(step, dict) else step
            lines.append(f"  {r.get('id')}  {name}  {r.get('state')}  {render.timestamp(r.get('created_at'))}")
        fail("\n".join(lines))
    return str(runs[0]["id"])


def _nodes(tree: dict[str, Any]) -> list[dict[str, Any]]:
    found, stack = [], [tree]
    while stack:
        node = stack.pop()
        found.append(node)
        stack.extend(child for child in node.get("children") or [] if isinstance(child, dict))
    return found


async def resolve_node(client: Client, run_id: str, text: str) -> str:
    """The id of the one node of run `run_id` whose id is `text`, starts with it or ends with it."""
    text = text.strip()
    if _is_whole_id(text):
        return text.lower()
    digits = text.replace("-", "").lower()
    if len(digits) < MIN_PREFIX_DIGITS or not all(c in "0123456789abcdef" for c in digits):
        fail(f"{text!r} is not a node id, nor its start or end: give at least {MIN_PREFIX_DIGITS} of its hex "
             "digits, as `aetr runs events RUN` shows them")
    nodes = _nodes(await client.get_run(run_id))
    matches = [n for n in nodes if (plain := str(n.get("id", "")).replace("-", "")).startswith(digits)
               or plain.endswith(digits)]
    if not matches:
        fail(f"run {run_id} has no node whose id starts or ends with {text}: `aetr runs events {run_id}` "
             "shows its nodes")
    if len(matches) > 1:
        lines = [f"{text} matches {len(matches)} nodes of run {run_id}; give more of the one you mean:"]
        for n in matches[:CANDIDATES_SHOWN]:
            step = n.get("step")
            name = step.get("name") if isinstance(step, dict) else step
            lines.append(f"  {n.get('id')}  {name}  {n.get('state')}")
        fail("\n".join(lines))
    return str(matches[0]["id"])


# aetr run


def _read_file(option: str, path: str) -> str:
    """The text of the file an option names; '-' is standard input."""
    try:
        return sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        fail(f"cannot read {option} {path}: {exc.strerror if isinstance(exc, OSError) else exc}")


def _parse_json(text: str, origin: str, example: str) -> Any:
    """`text` as JSON, or a usage error naming where it came from and how it should look."""
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        fail(f"{origin} is not valid JSON ({exc}); e.g. {example}")


def _run_input(input: str | None, input_file: str | None) -> Any:
    """The run input from --input or --input-file (JSON); `{}` when neither is given."""
    if input is not None and input_file is not None:
        fail("give --input or --input-file, not both")
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


async def _start(client: Client, step: str, value: Any, idempotency_key: str | None,
                 notify: str | None) -> dict[str, Any]:
    try:
        return await client.start_run(step, value, idempotency_key=idempotency_key, notify=notify)
    except AetrError as exc:
        if exc.status == 422 and "no step named" in exc.detail:
            fail(f"no step named (or with id) {step!r}: create it with `aetr apply FILE`; "
                 "`aetr steps list` shows the steps there are")
        raise


def run(
    ctx: typer.Context,
    step: Annotated[str, typer.Argument(metavar="STEP", help="Step name or id.", show_default=False)],
    input: Annotated[
        str | None, typer.Option("--input", metavar="JSON",
                                 help='Run input, e.g. \'{"source": "acme"}\'. Default {}.', show_default=False)
    ] = None,
    input_file: Annotated[str | None, typer.Option(
        metavar="FILE", help="Read the run input (JSON) from FILE; '-' reads standard input.",
        show_default=False)] = None,
    wait: Annotated[bool, typer.Option("--wait", help="Wait for the end and print the output as JSON.")] = False,
    timeout: Annotated[
        float | None,
        typer.Option(metavar="SECONDS", min=0, help="With --wait: give up waiting after SECONDS (implies --wait).",
                     show_default=False),
    ] = None,
    idempotency_key: Annotated[
        str | None, typer.Option(metavar="KEY", help="Starting twice with the same KEY gives the same run.",
                                 show_default=False)
    ] = None,
    notify: Annotated[
        str | None,
        typer.Option(metavar="URL", help="POST a CloudEvent to URL (http or https) when the run ends; tried again "
                                         "until it answers 2xx.", show_default=False),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the whole run as JSON (with --wait, once it "
                                                         "ends) instead of its id or output.")] = False,
) -> None:
    """Start a run; print its id, or with --wait its output (exit 1 if it ends in error or cancelled)."""
    value = _run_input(input, input_file)
    waiting = wait or timeout is not None

    async def work(client: Client) -> dict[str, Any]:
        started = await _start(client, step, value, idempotency_key, notify)
        if not waiting:
            return started
        run_id = str(started["id"])
        err.print(f"[dim]run {escape(run_id)} started; waiting[/]")
        try:
            return await client.wait_run(run_id, math.inf if timeout is None else timeout)
        except TimeoutError:
            fail(f"run {run_id} is not finished after {timeout}s; it goes on: follow it with `aetr runs show {run_id}`",
                 EXIT_RUN_FAILED)

    result = api(ctx, work)
    if as_json:
        print_json(result)
        if waiting and result.get("state") != "complete":
            raise typer.Exit(EXIT_RUN_FAILED)
    elif not waiting:
        sys.stdout.write(f"{result['id']}\n")
    elif result.get("state") == "complete":
        print_json(result.get("output"))
    else:
        fail(_run_failure(result), EXIT_RUN_FAILED)


# aetr runs ...


@app.command("list", cls=Command)
def runs_list(
    ctx: typer.Context,
    state: Annotated[str | None, typer.Option(metavar="STATE", help="Only runs in STATE (pending, executing, "
                                              "complete, error, cancelled).", show_default=False)] = None,
    step: Annotated[str | None, typer.Option(metavar="STEP", help="Only runs of STEP.", show_default=False)] = None,
    limit: Annotated[int | None, typer.Option(metavar="N", min=1, help="At most N runs (default 50).",
                                              show_default=False)] = None,
    cursor: Annotated[str | None, typer.Option(metavar="CURSOR", help="The page after a previous list's.",
                                               show_default=False)] = None,
    as_json: AsJson = False,
) -> None:
    """List root runs, newest first (whole ids when the output is not a terminal, and in --json)."""
    page = api(ctx, lambda client: client.list_runs(state=state, step=step, limit=limit, cursor=cursor))
    if as_json:
        print_json(page)
        return
    runs = [r for r in page.get("runs") or [] if isinstance(r, dict)]
    if not runs:
        err.print("no runs")
    else:
        emit_table(render.runs_table(runs))
    next_cursor = page.get("next_cursor")
    if next_cursor:
        err.print(f"[dim]more: aetr runs list --cursor {escape(str(next_cursor))}[/]")


@app.command("show", cls=Command)
def runs_show(
    ctx: typer.Context,
    run_id: Annotated[str, typer.Argument(
        metavar="RUN", help="Run id or its start, or the whole id of any of its nodes.", show_default=False)],
    as_json: AsJson = False,
) -> None:
    """Show a run tree: each node's step, kind, state, attempt and duration."""

    async def work(client: Client) -> dict[str, Any]:
        return await client.get_run(await resolve_run(client, run_id))

    _print_run(api(ctx, work), as_json)


def _print_run(found: dict[str, Any], as_json: bool) -> None:
    """A run tree as `runs show` prints it: the tree, then its output or how it failed; or the raw JSON."""
    if as_json:
        print_json(found)
        return
    out.print(render.run_tree(found))
    if found.get("state") == "complete":
        # One line, cut to the terminal: `--json` has the whole output.
        summary = render.one_line(found.get("output"), max(40, out.width - len("output ")))
        out.print(f"[green]output[/] {escape(summary)}", soft_wrap=True)
    elif found.get("state") in {"error", "cancelled"}:
        out.print(f"[red]{escape(_run_failure(found))}[/]", soft_wrap=True)


@app.command("events", cls=Command)
def runs_events(ctx: typer.Context, run_id: RunArg, as_json: AsJson = False) -> None:
    """Show a run's history in the order it happened: each line's node, its step, what happened."""

    async def work(client: Client) -> tuple[list[dict[str, Any]], dict[str, str]]:
        whole = await resolve_run(client, run_id)
        events = await client.run_events(whole)
        steps: dict[str, str] = {}
        if not as_json and any(e.get("node_id") and not (e.get("data") or {}).get("step") for e in events):
            # Recorded before each line named its step: the run tree says which step each node ran.
            for node in _nodes(await client.get_run(whole)):
                step = node.get("step")
                steps[str(node.get("id"))] = str(step.get("name") if isinstance(step, dict) else step)
        return events, steps

    events, steps = api(ctx, work)
    if as_json:
        print_json(events)
    else:
        emit_table(render.events_table(events, steps))


@app.command("cancel", cls=Command)
def runs_cancel(ctx: typer.Context, run_id: RunArg, as_json: AsJson = False) -> None:
    """Cancel every node of a run that has not finished."""
    _act(ctx, run_id, as_json, Client.cancel_run)


@app.command("retry", cls=Command)
def runs_retry(ctx: typer.Context, run_id: RunArg, as_json: AsJson = False) -> None:
    """Run the failed and cancelled nodes of a run again (complete nodes are kept)."""
    _act(ctx, run_id, as_json, Client.retry_run)


def _act(ctx: typer.Context, run_id: str, as_json: bool,
         action: Callable[[Client, str], Awaitable[dict[str, Any]]]) -> None:
    """Do `action` to the run `run_id` names (any unique start of its id); print the run's new state."""

    async def work(client: Client) -> dict[str, Any]:
        return await action(client, await resolve_run(client, run_id))

    found = api(ctx, work)
    if as_json:
        print_json(found)
    else:
        out.print(f"run {escape(str(found.get('id')))}: {render.state(found.get('state'))}")


@app.command("delete", cls=Command)
def runs_delete(ctx: typer.Context, run_id: RunArg, as_json: AsJson = False) -> None:
    """Delete an ended run with its nodes and history (a run still going must be cancelled first)."""

    async def work(client: Client) -> str:
        whole = await resolve_run(client, run_id)
        await client.delete_run(whole)
        return whole

    deleted = api(ctx, work)
    if as_json:
        print_json({"id": deleted, "deleted": True})
    else:
        out.print(f"run {escape(deleted)}: deleted")


DURATION_UNITS: Final = {"d": 86_400, "h": 3_600, "m": 60, "s": 1}  # seconds in one of each
DURATION_EXAMPLES: Final = "30d, 12h, 15m or 0s"
MAX_PURGE_S: Final = 36_525 * 86_400  # seconds; the server refuses longer


def parse_duration(text: str) -> float:
    """Seconds in a duration written as a number and one unit (30d, 12h, 15m, 0s; 1.5d too)."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([dhms])\s*", text.lower())
    if match is None:
        fail(f"--older-than {text!r} is not a duration: write a number and a unit, e.g. {DURATION_EXAMPLES}")
    seconds = float(match.group(1)) * DURATION_UNITS[match.group(2)]
    if seconds > MAX_PURGE_S:
        fail(f"--older-than {text!r} is more than a hundred years: no run ended that long ago")
    return seconds


@app.command("purge", cls=Command)
def runs_purge(
    ctx: typer.Context,
    older_than: Annotated[str, typer.Option(
        "--older-than", metavar="DURATION",
        help=f"Delete the runs that ended longer ago than this: {DURATION_EXAMPLES} (0s: every ended run).",
        show_default=False)],
    as_json: AsJson = False,
) -> None:
    """Delete the runs that ended longer ago than a duration, with their nodes and history; say how many.

    Runs still going are kept, and so is a run whose end notification is still being delivered."""
    seconds = parse_duration(older_than)
    deleted = api(ctx, lambda client: client.purge_runs(seconds))
    if as_json:
        print_json({"deleted": deleted})
    else:
        out.print(f"deleted {deleted} run{'' if deleted == 1 else 's'} that ended more than {older_than.strip()} ago")


SIGNAL_ANSWERS: Final = "--output, --output-file or --error"


@app.command("signal", cls=Command)
def runs_signal(
    ctx: typer.Context,
    run_id: RunArg,
    node_id: Annotated[str, typer.Argument(
        metavar="NODE", help="The wait's node: its id, or the start or end of it (`runs show` prints it while it "
                             "waits).", show_default=False)],
    output: Annotated[
        str | None,
        typer.Option(metavar="JSON", help='Complete the wait with this output, e.g. \'{"approved": true}\'.',
                     show_default=False),
    ] = None,
    output_file: Annotated[
        str | None, typer.Option(metavar="FILE", help="Complete the wait with the output (JSON) in FILE; '-' reads "
                                                      "standard input.", show_default=False)
    ] = None,
    error: Annotated[
        str | None, typer.Option(metavar="MESSAGE", help="Fail the wait with MESSAGE (error kind signal).",
                                 show_default=False)
    ] = None,
    as_json: AsJson = False,
) -> None:
    """Answer a signal wait: complete it with an output, or fail it; then show the run tree."""
    given = [name for name, value in (("--output", output), ("--output-file", output_file), ("--error", error))
             if value is not None]
    if not given:
        fail(f"give one of {SIGNAL_ANSWERS}: the output to complete the wait with, or the message to fail it")
    if len(given) > 1:
        fail(f"give only one of {SIGNAL_ANSWERS}, not {' and '.join(given)}")
    example = """--output '{"approved": true}'"""
    answer: dict[str, Any]
    if error is not None:
        if not error.strip():
            fail("--error needs a message saying why the wait fails")
        answer = {"error": error}
    elif output_file is not None:
        answer = {"output": _parse_json(_read_file("--output-file", output_file), f"--output-file {output_file}",
                                        example)}
    else:
        answer = {"output": _parse_json(output or "", "--output", example)}

    async def work(client: Client) -> dict[str, Any]:
        whole = await resolve_run(client, run_id)
        node = await resolve_node(client, whole, node_id)
        return await client.signal(whole, node, **answer)

    _print_run(api(ctx, work), as_json)
