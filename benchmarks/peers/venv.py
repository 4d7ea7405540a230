"""The peers' own virtual environment: made on first use from benchmarks/peers/requirements.txt, apart from AETR's."""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Final

from benchmarks.processes import REPO, log

REQUIREMENTS: Final = Path(__file__).resolve().parent / "requirements.txt"
DEFAULT_VENV: Final = REPO / "benchmarks" / ".peers-venv"
INSTALLED_MARK: Final = "aetr-peers-requirements.txt"  # a copy of what was installed, inside the venv
CREATE_TIMEOUT_S: Final = 600.0  # seconds making the venv and installing into it may take


class PeerSetupError(RuntimeError):
    """The peers' environment could not be made; the message says what to do."""


def venv_path() -> Path:
    """Where the peers' venv lives: AETR_BENCH_PEERS_VENV, or benchmarks/.peers-venv (git-ignored)."""
    return Path(os.environ.get("AETR_BENCH_PEERS_VENV") or DEFAULT_VENV)


async def _run(*args: str) -> None:
    proc = await asyncio.create_subprocess_exec(*args, stdin=asyncio.subprocess.DEVNULL,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), CREATE_TIMEOUT_S)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise PeerSetupError(f"`{' '.join(args)}` did not finish within {CREATE_TIMEOUT_S:g} s") from None
    if proc.returncode != 0:
        tail = "\n".join(out.decode(errors="replace").splitlines()[-15:])
        raise PeerSetupError(f"`{' '.join(args)}` failed (exit {proc.returncode}):\n{tail}")


async def ensure_venv(path: Path | None = None) -> Path:
    """The Python of the peers' venv, made (or remade, when requirements.txt changed) first if need be."""
    venv = path or venv_path()
    python = venv / "bin" / "python"
    wanted = REQUIREMENTS.read_text()
    mark = venv / INSTALLED_MARK
    if python.exists() and mark.exists() and mark.read_text() == wanted:
        return python
    started = time.monotonic()
    log(f"making the peers' virtual environment in {venv} (Celery and Redis from requirements.txt)")
    shutil.rmtree(venv, ignore_errors=True)
    try:
        # The base interpreter, not AETR's venv: the peers' venv must not see AETR's packages.
        base = getattr(sys, "_base_executable", sys.executable)
        await _run(base, "-m", "venv", str(venv))
        await _run(str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                   "--no-deps", "-r", str(REQUIREMENTS))
    except (PeerSetupError, OSError) as exc:
        shutil.rmtree(venv, ignore_errors=True)
        raise PeerSetupError(f"could not make the peers' virtual environment in {venv}: {exc}") from exc
    mark.write_text(wanted)
    log(f"peers' virtual environment ready in {time.monotonic() - started:.1f} s")
    return python
