"""What every `aetr` command shares: the consoles, the API call wrapper, JSON and table output, help tidying."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated, Any, Final, NoReturn, TypeVar

import orjson
import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperArgument, TyperCommand, TyperGroup, TyperOption

from aetr.cli import render
from aetr.client import AetrConnectionError, AetrError, Client

__all__ = [
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_RUN_FAILED",
    "EXIT_USAGE",
    "AsJson",
    "Command",
    "Group",
    "Settings",
    "api",
    "emit_table",
    "err",
    "explain",
    "fail",
    "noun_app",
    "out",
    "print_json",
]

T = TypeVar("T")

EXIT_OK: Final = 0
EXIT_RUN_FAILED: Final = 1  # the run ended in error or cancelled, or is still going when --timeout passed
EXIT_USAGE: Final = 2  # a bad command line, or an error answered by (or reaching) the API
EXIT_INTERRUPTED: Final = 130  # the shell's convention for Ctrl-C

out = Console(highlight=False)
# soft_wrap: an error message stays on one line, whatever the terminal width, so it can be grepped.
err = Console(stderr=True, highlight=False, soft_wrap=True)

AsJson = Annotated[bool, typer.Option("--json", help="Print the answer as JSON instead.")]


def _no_type(ctx: Any) -> None:
    return None


class _QuietFlags:
    """Help without Python types: `--wait`, not `--wait <bool>`; `RUN`, not `RUN <str>` (an option that takes a
    value names it with its metavar, e.g. `--input JSON`)."""

    # Any: typer vendors its own click, whose classes are not public.
    def get_params(self, ctx: Any) -> list[Any]:
        params: list[Any] = super().get_params(ctx)  # type: ignore[misc]  # a mixin before a click class
        for param in params:
            if isinstance(param, TyperOption) and param.is_flag and param.metavar is None:
                param.metavar = ""
            elif isinstance(param, TyperArgument):
                param.display_type_rich = _no_type  # type: ignore[method-assign]  # the help's type column only
        return params


class Command(_QuietFlags, TyperCommand):
    """An `aetr` command."""


class Group(_QuietFlags, TyperGroup):
    """A group of `aetr` commands (the top level, or one noun such as `runs`)."""


def noun_app(help: str) -> typer.Typer:
    """The sub-app of one noun (`aetr runs ...`, `aetr steps ...`): add it with `app.add_typer(sub, name=...)`."""
    return typer.Typer(help=help, cls=Group, no_args_is_help=True)


@dataclass(frozen=True, slots=True)
class Settings:
    """Where the API is and how to authenticate, from the global options."""

    url: str
    token: str | None


def fail(message: str, code: int = EXIT_USAGE) -> NoReturn:
    """Print `error: message` to stderr and end the command with `code`."""
    err.print(f"[red]error:[/] {escape(message)}")
    raise typer.Exit(code)


def explain(exc: AetrError) -> str:
    """One line for an API error, with the fix when there is an obvious one."""
    if isinstance(exc, AetrConnectionError):
        return exc.detail
    if exc.status == 401:
        return f"{exc.detail} (HTTP 401): pass --token or set AETR_API_TOKEN"
    return f"{exc.detail} (HTTP {exc.status})"


def api(ctx: typer.Context, work: Callable[[Client], Awaitable[T]]) -> T:
    """Run `work` with a client for the configured server; API errors end the command with exit code 2."""
    settings: Settings = ctx.find_root().obj

    async def go() -> T:
        async with Client(settings.url, settings.token) as client:
            return await work(client)

    try:
        return asyncio.run(go())
    except AetrError as exc:
        fail(explain(exc))
    except KeyboardInterrupt:
        err.print("interrupted")
        raise typer.Exit(EXIT_INTERRUPTED) from None


def print_json(value: Any) -> None:
    """`value` as indented JSON on stdout."""
    # Plain stdout, not Rich: the output is for pipes and `jq`, so no wrapping and no markup.
    sys.stdout.write(orjson.dumps(value, option=orjson.OPT_INDENT_2).decode() + "\n")


def emit_table(table: render.Rows) -> None:
    """A table on stdout: drawn to the terminal's width on a terminal, tab-separated lines with a header when
    stdout is a pipe or a file (one row a line, nothing cut or wrapped, for `cut`, `awk` and `sort`)."""
    if out.is_terminal:
        out.print(render.drawn(table, out.width))
    else:
        sys.stdout.write(render.tab_separated(table))
