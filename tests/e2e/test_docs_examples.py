"""Every code block of Getting started and Writing a step service, run as a reader would run it.

Each page is run from the top in a fresh working directory, against a real `aetr serve` on SQLite, on free
loopback ports. How a block runs is read from its fence:

- ```` ```bash ````: run with `bash -e`, in order; shell variables carry over to the next blocks (`RUN=$(…)`).
- ```` ```bash title="… (keeps running)" ````: a terminal the reader leaves running (a server, a service):
  started in the background; the next block runs once every port the block names listens.
- ```` ```python title="NAME" ```` or ```` ```yaml title="NAME" ````: a file the reader saves as NAME.
- ```` ```python ```` without a title: a script, run with the project's Python.

Any other block fails the test: a page documents nothing a reader could not run. The pages' fixed ports
(9999 for AETR, 8001 and 8002 for step services) become free ports wherever they appear, and the working
directory holds what the commands name in a clone: `.venv/bin/aetr` and `.venv/bin/python` (this
environment's), `src/aetr/examples/catalog.yaml` (calling the services' port), and `scripts/serve`, which
serves as the repository's does once its install step is done.
"""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.e2e.conftest import LOGS
from tests.e2e.harness import STOP_TIMEOUT_S, aetr_command, clean_env, free_port, wait_listening
from tests.e2e.test_tutorial import catalog_on_port

DOCS = Path(__file__).resolve().parents[2] / "docs"
PAGES = ("getting-started.md", "step-service.md")
SERVER_PORT = 9999  # what `scripts/serve` listens on
PAGE_PORTS = (SERVER_PORT, 8001, 8002)
BLOCK_TIMEOUT_S = 60.0  # seconds one block may take (the slowest waits for a few runs of about a second)
FENCE = re.compile(r"^```(?P<lang>[\w-]*)(?P<attrs>[^\n]*)\n(?P<body>.*?)^```[ \t]*$", re.M | re.S)
TITLE = re.compile(r'title="([^"]*)"')
KEEPS_RUNNING = "(keeps running)"


@dataclass(frozen=True)
class Block:
    """One fenced block of a page."""

    page: str
    line: int
    lang: str
    title: str | None
    body: str

    def __str__(self) -> str:
        return f"docs/{self.page}:{self.line} ({self.lang}{f' {self.title!r}' if self.title else ''})"


def blocks_of(page: str) -> list[Block]:
    """The page's fenced blocks, in order."""
    text = (DOCS / page).read_text(encoding="utf-8")
    found = []
    for m in FENCE.finditer(text):
        title = TITLE.search(m["attrs"])
        found.append(Block(page, text.count("\n", 0, m.start()) + 1, m["lang"], title[1] if title else None,
                           m["body"]))
    return found


def test_the_pages_hold_only_blocks_that_the_runner_knows_how_to_run() -> None:
    for page in PAGES:
        blocks = blocks_of(page)
        assert blocks, f"docs/{page} has no code block"
        for block in blocks:
            runnable = (block.lang == "bash" or (block.lang == "python")
                        or (block.lang == "yaml" and block.title is not None))
            assert runnable, f"{block}: neither a bash or python block nor a titled file: the test cannot run it"


class Pages:
    """A reader's working directory for one page, with its ports and its long-running terminals."""

    def __init__(self, workdir: Path, logs: list[Path]) -> None:
        self.workdir = workdir
        self.logs = logs
        self.ports = {port: free_port() for port in PAGE_PORTS}
        self.env = clean_env({"AETR_URL": f"http://127.0.0.1:{self.ports[SERVER_PORT]}", "COLUMNS": "120",
                              "TERM": "dumb"})
        self.state = workdir / ".shell-variables"
        self.background: list[asyncio.subprocess.Process] = []
        self._lay_out()

    def _lay_out(self) -> None:
        bin_dir = self.workdir / ".venv" / "bin"
        bin_dir.mkdir(parents=True)
        self._script(bin_dir / "aetr", f'exec {shlex.join(aetr_command())} "$@"')
        self._script(bin_dir / "python", f'exec {shlex.quote(sys.executable)} "$@"')
        self._script(self.workdir / "scripts" / "serve",
                     f'exec .venv/bin/aetr serve --port {self.ports[SERVER_PORT]} "$@"')
        examples = self.workdir / "src" / "aetr" / "examples"
        examples.mkdir(parents=True)
        catalog = catalog_on_port(self.workdir, self.ports[8001])
        catalog.rename(examples / "catalog.yaml")

    @staticmethod
    def _script(path: Path, line: str) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"#!/usr/bin/env bash\n{line}\n", encoding="utf-8")
        path.chmod(0o755)

    def localise(self, text: str) -> str:
        """The text with each of the page's fixed ports replaced by this run's free one."""
        for fixed, free in self.ports.items():
            text = re.sub(rf"(?<![\d.]){fixed}(?!\d)", str(free), text)
        return text

    def ports_named(self, block: Block) -> list[int]:
        """The free ports a long-running block will listen on: those it names (`scripts/serve`: AETR's)."""
        named = [free for fixed, free in self.ports.items() if re.search(rf"(?<![\d.]){fixed}(?!\d)", block.body)]
        if "scripts/serve" in block.body:
            named.append(self.ports[SERVER_PORT])
        return named

    def _shell_script(self, body: str) -> str:
        # `set -a` exports every variable a block assigns, so that `export -p` hands it to the next block.
        return (f"set -a -e -o pipefail\n[ -f {shlex.quote(str(self.state))} ] && . {shlex.quote(str(self.state))}\n"
                f"{body}\nexport -p > {shlex.quote(str(self.state))}\n")

    async def run(self, block: Block) -> None:
        """Run (or save) one block as the page says to."""
        body = self.localise(block.body)
        if block.title is not None and not block.title.endswith(KEEPS_RUNNING):
            (self.workdir / block.title).write_text(body, encoding="utf-8")
            return
        if block.lang == "python":
            await self._foreground(block, [sys.executable, "-c", body])
        elif block.title is not None:
            await self._start(block, body)
        else:
            await self._foreground(block, ["bash", "-c", self._shell_script(body)])

    async def _foreground(self, block: Block, args: list[str]) -> None:
        proc = await asyncio.create_subprocess_exec(
            *args, cwd=self.workdir, env=self.env, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            async with asyncio.timeout(BLOCK_TIMEOUT_S):
                out, _ = await proc.communicate()
        except TimeoutError:
            proc.kill()
            await proc.communicate()
            raise AssertionError(f"{block} did not finish within {BLOCK_TIMEOUT_S:g} s") from None
        assert proc.returncode == 0, (f"{block} exited with {proc.returncode}:\n{block.body}\n--- output\n"
                                      f"{out.decode(errors='replace')}")

    async def _start(self, block: Block, body: str) -> None:
        log = self.workdir / f"block-{block.line}.log"
        self.logs.append(log)
        with log.open("ab") as out:
            proc = await asyncio.create_subprocess_exec(
                "bash", "-c", f"set -e\n{body}", cwd=self.workdir, env=self.env, stdin=subprocess.DEVNULL,
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)  # its own process group: stopped whole
        self.background.append(proc)
        ports = self.ports_named(block)
        assert ports, f"{block} keeps running but names no port to wait for"
        for port in ports:
            try:
                await wait_listening(port)
            except AssertionError as exc:
                raise AssertionError(f"{block}: {exc}; its output:\n{log.read_text(errors='replace')}") from None

    async def stop(self) -> None:
        """SIGTERM to every long-running block's process group, newest first; SIGKILL to what outlives it."""
        for proc in reversed(self.background):
            if proc.returncode is None:
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), STOP_TIMEOUT_S)
            except TimeoutError:
                os.killpg(proc.pid, signal.SIGKILL)
                await proc.wait()


@pytest.fixture
async def pages(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Pages]:
    """A fresh reader's directory; its long-running blocks are stopped at the end, whatever happened."""
    if shutil.which("curl") is None:
        pytest.skip("the pages use curl, which is not installed")
    logs: list[Path] = []
    request.node.stash[LOGS] = logs
    reader = Pages(tmp_path / "clone", logs)
    try:
        yield reader
    finally:
        await reader.stop()


@pytest.mark.parametrize("page", PAGES)
async def test_every_block_of_the_page_runs_as_written(page: str, pages: Pages) -> None:
    for block in blocks_of(page):
        await pages.run(block)
