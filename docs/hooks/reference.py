"""Build-time hooks of the documentation site: the pages generated from the code.

mkdocs loads this file by its path (mkdocs.yml, `hooks`). A page asks for a generated part with a marker
comment, which `on_page_markdown` replaces on every build, so no hand-kept copy can drift from the code:

- `<!-- cli-reference -->`: every `aetr` command, argument and option, from the Typer application, written by
  Typer's own Markdown generator (the one behind `typer ... utils docs`);
- `<!-- client-reference -->`: the public methods of `aetr.client.Client`, from their signatures and docstrings.
"""

from __future__ import annotations

import inspect
import re
from typing import Any

import typer
import typer.main
from typer.cli import get_docs_for_click

try:
    from typer.core import MARKUP_MODE_KEY
except ImportError:  # older Typer: its generator reads no markup mode, and help text is used as written
    MARKUP_MODE_KEY = "TYPER_RICH_MARKUP_MODE"

from aetr import client
from aetr.cli.main import app

CLI_MARKER = "<!-- cli-reference -->"
CLIENT_MARKER = "<!-- client-reference -->"


def cli_reference() -> str:
    """The Markdown reference of `aetr` and its subcommands, its top heading at level 2."""
    command = typer.main.get_command(app)
    # As `typer ... utils docs` does: help text is read with the application's own markup mode.
    ctx = typer.Context(command, info_name="aetr", obj={MARKUP_MODE_KEY: app.rich_markup_mode})
    return get_docs_for_click(obj=command, ctx=ctx, indent=1, name="aetr")


def _signature(method: Any) -> str:
    """`(arg: type = default, ...) -> type` without `self`, the annotations as written in the code."""
    signature = inspect.signature(method, eval_str=True)
    params = [p for name, p in signature.parameters.items() if name != "self"]
    text = str(signature.replace(parameters=params))
    # A default that only means "not given" (the client's own sentinel) reads best as `...`.
    text = re.sub(r"<_Unset\.\w+: \d+>", "...", text)
    return re.sub(r"\b(typing|aetr\.client)\.", "", text)


def client_reference() -> str:
    """A section per public method of `aetr.client.Client`, and the errors it raises, from the code."""
    parts: list[str] = []
    for name, member in inspect.getmembers(client.Client, inspect.isfunction):
        if name.startswith("_"):
            continue
        doc = inspect.getdoc(member) or ""
        prefix = "async " if inspect.iscoroutinefunction(member) else ""
        parts.append(f"### `{name}`\n\n```python\n{prefix}def {name}{_signature(member)}\n```\n\n{doc}\n")
    classes = [f"- `{cls.__name__}`: {inspect.getdoc(cls) or ''}"
               for cls in (client.Applied, client.AetrError, client.AetrConnectionError)]
    return "\n".join(parts) + "\n## Results and errors\n\n" + "\n".join(classes) + "\n"


def on_page_markdown(markdown: str, page: Any, **_: Any) -> str:
    """Replace a page's markers with the parts generated from the code."""
    if CLI_MARKER in markdown:
        markdown = markdown.replace(CLI_MARKER, cli_reference())
    if CLIENT_MARKER in markdown:
        markdown = markdown.replace(CLIENT_MARKER, client_reference())
    return markdown
