"""Real `aetr` processes for end-to-end tests: start one, wait until it answers, stop or kill it, run the CLI."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson

READY_TIMEOUT_S = 30.0  # seconds for a process to start answering (importing the app alone takes ~2 s)
STOP_TIMEOUT_S = 10.0  # seconds a process gets to exit after SIGTERM before it is killed
CLI_TIMEOUT_S = 30.0  # seconds one CLI command may take (the slowest here waits ~2 s for a run)
PROBE_INTERVAL_S = 0.05  # seconds between two probes of a process that is starting or stopping
LEASE_S = 1.0  # AETR_LEASE_S: short, so a restarted server takes over the dead one's work quickly
POLL_S = 0.2  # AETR_POLL_S
TERMINAL = frozenset({"complete", "error", "cancelled"})
# Rich sizes and colours the CLI's output from the terminal: pin both, whatever the developer's shell says.
CLI_TERMINAL = {"COLUMNS": "120", "LINES": "50", "TERM": "dumb"}


def aetr_command() -> list[str]:
    """The `aetr` console script installed with this interpreter (the venv under test)."""
    script = shutil.which("aetr", path=str(Path(sys.executable).parent))
    if script is None:
        # Installed without scripts (e.g. on PYTHONPATH): the same entry point through this Python.
        return [sys.executable, "-c", "from aetr.cli.main import app; app(prog_name='aetr')"]
    return [script]


def clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This environment without the developer's AETR_* settings, plus `extra`: only what a test sets counts."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("AETR_")}
    env.update(extra or {})
    return env


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def wait_listening(port: int, timeout: float = READY_TIMEOUT_S) -> None:  # noqa: ASYNC109 -- a plain deadline
    """Wait until something accepts TCP connections on 127.0.0.1:`port`."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            if time.monotonic() > deadline:
                raise AssertionError(f"nothing listens on 127.0.0.1:{port} after {timeout:g} s") from None
            await asyncio.sleep(PROBE_INTERVAL_S)
            continue
        writer.close()
        await writer.wait_closed()
        return


class Process:
    """One long-running `aetr` subprocess; stdout and stderr go to a log file that a failing test shows."""

    def __init__(self, args: list[str], env: Mapping[str, str], log_path: Path, cwd: Path,
                 open_files: int | None = None) -> None:
        self.args = args
        self.env = dict(env)
        self.log_path = log_path
        self.cwd = cwd
        self.open_files = open_files  # the process's limit on open files (soft and hard), as `ulimit -n` sets it
        self._popen: subprocess.Popen[bytes] | None = None

    def __str__(self) -> str:
        return f"`aetr {' '.join(self.args)}`"

    def start(self) -> None:
        """Spawn the process (again, after a kill), appending to the same log."""
        assert not self.running, f"{self} is already running"
        with self.log_path.open("ab") as log:
            log.write(f"$ aetr {' '.join(self.args)}\n".encode())
            log.flush()
            self._popen = subprocess.Popen(
                [*aetr_command(), *self.args], env=self.env, cwd=self.cwd,
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, preexec_fn=self._limit_files)

    def _limit_files(self) -> None:
        """In the child, before `aetr` starts: apply `open_files`."""
        if self.open_files is not None:
            import resource

            resource.setrlimit(resource.RLIMIT_NOFILE, (self.open_files, self.open_files))

    @property
    def pid(self) -> int:
        """The process's id (it has been started)."""
        assert self._popen is not None, f"{self} was not started"
        return self._popen.pid

    @property
    def running(self) -> bool:
        """Whether the process has been started and has not exited."""
        return self._popen is not None and self._popen.poll() is None

    @property
    def returncode(self) -> int | None:
        """The exit code (negative: the signal that ended it), or None while it runs."""
        return None if self._popen is None else self._popen.poll()

    def log(self) -> str:
        """Everything the process has written so far."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def kill(self) -> None:
        """SIGKILL: the process dies at once, in the middle of whatever it was doing."""
        if self._popen is not None and self._popen.poll() is None:
            self._popen.kill()
            self._popen.wait()  # returns at once after SIGKILL; reaps the child

    async def wait_exit(self, timeout: float) -> int:  # noqa: ASYNC109 -- a plain deadline
        """The exit code once the process has exited; AssertionError (with its log) after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while (code := self.returncode) is None:
            if time.monotonic() > deadline:
                raise AssertionError(f"{self} is still running after {timeout:g} s; its log:\n{self.log()}")
            await asyncio.sleep(PROBE_INTERVAL_S)
        return code

    async def stop(self) -> None:
        """SIGTERM, then SIGKILL if it has not exited within STOP_TIMEOUT_S."""
        if self._popen is None or not self.running:
            return
        self._popen.terminate()
        try:
            await self.wait_exit(STOP_TIMEOUT_S)
        except AssertionError:
            self.kill()


class AetrServer(Process):
    """`aetr serve` on a loopback port, on one database, with short leases and a short poll interval."""

    def __init__(self, port: int, database_url: str, log_path: Path, cwd: Path,
                 env: Mapping[str, str] | None = None, open_files: int | None = None) -> None:
        settings = {"AETR_DATABASE_URL": database_url, "AETR_LEASE_S": str(LEASE_S), "AETR_POLL_S": str(POLL_S)}
        super().__init__(["serve", "--port", str(port)], clean_env({**settings, **(env or {})}), log_path, cwd,
                         open_files)
        self.port = port
        self.url = f"http://127.0.0.1:{port}"

    async def start_ready(self) -> None:
        """Start the server and wait until `GET /healthz` answers 200."""
        self.start()
        await self.wait_healthy()

    async def wait_healthy(self) -> None:
        """Wait until `GET /healthz` answers 200; fail at once, with the log, if the process exits meanwhile."""
        deadline = time.monotonic() + READY_TIMEOUT_S
        last = "no answer"
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as http:
            while True:
                if not self.running:
                    raise AssertionError(f"{self} exited with {self.returncode} while starting; its log:\n{self.log()}")
                try:
                    async with http.get(f"{self.url}/healthz") as response:
                        if response.status == 200:
                            return
                        last = f"HTTP {response.status}: {await response.text()}"
                except (aiohttp.ClientError, TimeoutError) as exc:
                    last = f"{type(exc).__name__}: {exc}"
                if time.monotonic() > deadline:
                    raise AssertionError(f"{self}: /healthz not 200 after {READY_TIMEOUT_S:g} s ({last}); "
                                         f"its log:\n{self.log()}")
                await asyncio.sleep(PROBE_INTERVAL_S)


class Launcher:
    """Starts the `aetr` processes of one test, and stops every one of them at its end whatever happened."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.processes: list[Process] = []
        self.log_paths: list[Path] = []  # grows as processes start: a failing test's report shows them all

    def _log_path(self, name: str) -> Path:
        path = self.workdir / f"{name}-{len(self.log_paths) + 1}.log"
        self.log_paths.append(path)
        return path

    def spawn(self, *args: str, env: Mapping[str, str] | None = None) -> Process:
        """Start `aetr ARGS` (not waiting for anything)."""
        process = Process(list(args), clean_env(env), self._log_path(args[0]), self.workdir)
        self.processes.append(process)
        process.start()
        return process

    async def serve(self, database_url: str, *, port: int | None = None, env: Mapping[str, str] | None = None,
                    open_files: int | None = None) -> AetrServer:
        """Start `aetr serve` on a free loopback port and wait until it is healthy."""
        server = AetrServer(port or free_port(), database_url, self._log_path("serve"), self.workdir, env,
                            open_files)
        self.processes.append(server)
        await server.start_ready()
        return server

    async def stop_all(self) -> None:
        """Stop every process, newest first (the server before the services it calls)."""
        for process in reversed(self.processes):
            await process.stop()


@dataclass(frozen=True)
class CliResult:
    """What one `aetr` command did: its exit code and output."""

    args: tuple[str, ...]
    code: int
    stdout: str
    stderr: str

    def __str__(self) -> str:
        return (f"$ aetr {' '.join(self.args)}\nexit code {self.code}\n"
                f"--- stdout\n{self.stdout}--- stderr\n{self.stderr}")


async def cli(*args: str, env: Mapping[str, str] | None = None, cwd: Path | None = None) -> CliResult:
    """Run `aetr ARGS` as a user would, without blocking the event loop (a test's step services live in it)."""
    environment = {k: v for k, v in clean_env({**CLI_TERMINAL, **(env or {})}).items()
                   if k not in ("FORCE_COLOR", "TTY_COMPATIBLE")}
    proc = await asyncio.create_subprocess_exec(
        *aetr_command(), *args, env=environment, cwd=cwd,
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        async with asyncio.timeout(CLI_TIMEOUT_S):
            out, err = await proc.communicate()
    except BaseException as exc:
        if proc.returncode is None:
            proc.kill()
            await proc.communicate()
        if isinstance(exc, TimeoutError):
            raise AssertionError(f"`aetr {' '.join(args)}` did not finish within {CLI_TIMEOUT_S:g} s") from None
        raise
    assert proc.returncode is not None
    return CliResult(args, proc.returncode, out.decode(), err.decode())


class Api:
    """Raw HTTP to one AETR server: status codes and JSON bodies as they come."""

    def __init__(self, http: aiohttp.ClientSession, base_url: str, token: str | None = None) -> None:
        self.http = http
        self.base_url = base_url
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}

    async def call(self, method: str, path: str, body: Any = None,
                   headers: Mapping[str, str] | None = None) -> tuple[int, Any]:
        """(status, decoded JSON body or None) of one request."""
        send = {**self.headers, **(headers or {})}
        data = None
        if body is not None:
            data = orjson.dumps(body)
            send["Content-Type"] = "application/json"
        async with self.http.request(method, self.base_url + path, data=data, headers=send) as response:
            raw = await response.read()
            return response.status, orjson.loads(raw) if raw else None

    async def put_step(self, spec: dict[str, Any]) -> dict[str, Any]:
        """Create or replace a step; its resolved tree."""
        status, body = await self.call("PUT", f"/api/v1/steps/{spec['name']}", spec)
        assert status in (200, 201), f"PUT step {spec['name']}: HTTP {status} {body}"
        return dict(body)

    async def start_run(self, step: str, run_input: Any) -> str:
        """Start a run; its id."""
        status, body = await self.call("POST", "/api/v1/runs", {"step": step, "input": run_input})
        assert status == 201, f"POST /runs: HTTP {status} {body}"
        return str(body["id"])

    async def run(self, run_id: str) -> dict[str, Any]:
        """The whole run tree as it is now."""
        status, body = await self.call("GET", f"/api/v1/runs/{run_id}")
        assert status == 200, f"GET run {run_id}: HTTP {status} {body}"
        return dict(body)

    async def wait_run(self, run_id: str, timeout: float = 30.0) -> dict[str, Any]:  # noqa: ASYNC109 -- a deadline
        """The run tree once the run has ended; AssertionError if it has not within `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            status, body = await self.call("GET", f"/api/v1/runs/{run_id}?wait={max(0.1, min(left, 10)):.1f}")
            assert status == 200, f"GET run {run_id}: HTTP {status} {body}"
            if body["state"] in TERMINAL:
                return dict(body)
            assert left > 0, f"run {run_id} is still {body['state']} after {timeout:g} s: {body}"

    async def events(self, run_id: str) -> list[dict[str, Any]]:
        """The run's history, oldest first."""
        status, body = await self.call("GET", f"/api/v1/runs/{run_id}/events")
        assert status == 200, f"GET events of {run_id}: HTTP {status} {body}"
        return list(body)


def nodes_by_name(run: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every node of a run tree, by step name (for trees in which each name appears once)."""
    found: dict[str, dict[str, Any]] = {}
    stack = [run]
    while stack:
        node = stack.pop()
        name = node["step"]["name"]
        assert name not in found, f"step {name} appears twice in the run; look nodes up by id"
        found[name] = node
        stack.extend(node["children"])
    return found


def all_nodes(run: dict[str, Any]) -> list[dict[str, Any]]:
    """Every node of a run tree, root first."""
    nodes, stack = [], [run]
    while stack:
        node = stack.pop()
        nodes.append(node)
        stack.extend(node["children"])
    return nodes
