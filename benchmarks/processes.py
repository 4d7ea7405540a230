"""The processes a benchmark drives: `aetr serve`, the step service, and py-spy; their memory and CPU time."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

import aiohttp
import orjson

from benchmarks import slower
from benchmarks.procstat import children_of, cpu_seconds

READY_TIMEOUT_S: Final = 60.0  # seconds for `aetr serve` to answer /healthz (it imports the app and migrates)
STOP_TIMEOUT_S: Final = 15.0  # seconds a process gets to exit after SIGTERM before it is killed
PROBE_INTERVAL_S: Final = 0.05  # seconds between two probes of a starting process
PROFILER_STOP_TIMEOUT_S: Final = 60.0  # seconds py-spy gets to write its output after SIGINT
PAGE_BYTES: Final = os.sysconf("SC_PAGE_SIZE")
PR_SET_PDEATHSIG: Final = 1
PROFILE_FLAGS: Final = "--rate 200 --threads"  # py-spy record options besides pid, format, output
REPO: Final = Path(__file__).resolve().parent.parent
SANDBOX_WORKER: Final = b"aetr.sandbox.worker"  # in the command line of a sandbox worker process
CALL_PROCESS: Final = b"aetr.engine.calls"  # in the command line of a call process


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _die_with_parent() -> None:
    """In the child, before exec: get SIGTERM if the benchmark driver dies, so nothing is left running."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def log(message: str) -> None:
    """A progress line on stderr (stdout carries only the JSON results)."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ---- /proc ---------------------------------------------------------------------------------------------


def peak_rss_mb(pid: int) -> float | None:
    """The process's peak resident set size (VmHWM) in MiB; None when it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def rss_mb(pid: int) -> float | None:
    """The process's current resident set size in MiB; None when it is gone."""
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE_BYTES / 2**20
    except (OSError, IndexError, ValueError):
        return None






def postgres_cpu_seconds() -> dict[int, float]:
    """CPU seconds used so far by each PostgreSQL process on this machine, by pid."""
    found: dict[int, float] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "comm").read_text().strip() != "postgres":
                    continue
            except OSError:
                continue
            if (used := cpu_seconds(int(entry.name))) is not None:
                found[int(entry.name)] = used
    return found


def load_average() -> float:
    """The machine's 1-minute load average."""
    return float(Path("/proc/loadavg").read_text().split()[0])




def is_worker_process(pid: int) -> bool:
    """Whether `pid` is a worker process of `aetr serve --workers N` (uvicorn starts them with multiprocessing)."""
    try:
        return b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def is_sandbox_worker(pid: int) -> bool:
    """Whether `pid` runs a sandbox worker."""
    try:
        return SANDBOX_WORKER in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def is_call_process(pid: int) -> bool:
    """Whether `pid` is a serving process's call process (AETR_STEP_CALLS=process)."""
    try:
        return CALL_PROCESS in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def kill_if_sandbox_worker(pid: int) -> None:
    """SIGKILL `pid` if it still runs a sandbox worker (a pid may have been reused since we saw it)."""
    with contextlib.suppress(OSError):
        if is_sandbox_worker(pid):
            os.kill(pid, signal.SIGKILL)


# ---- processes -----------------------------------------------------------------------------------------


class Process:
    """A subprocess whose output goes to a log file, stopped with SIGTERM then SIGKILL."""

    def __init__(self, name: str, args: list[str], env: Mapping[str, str], log_path: Path) -> None:
        self.name = name
        self.args = args
        self.env = dict(env)
        self.log_path = log_path
        self.popen: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        """The process id (it must have been started)."""
        assert self.popen is not None, f"{self.name} was not started"
        return self.popen.pid

    @property
    def running(self) -> bool:
        """Whether the process was started and has not exited."""
        return self.popen is not None and self.popen.poll() is None

    def start(self) -> None:
        """Spawn the process."""
        with self.log_path.open("ab") as out:
            out.write(f"$ {' '.join(self.args)}\n".encode())
            out.flush()
            self.popen = subprocess.Popen(self.args, env=self.env, cwd=REPO, stdin=subprocess.DEVNULL,
                                          stdout=out, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
        slower.place(self.popen.pid, self.name.replace(" ", "-"))

    def tail(self, lines: int = 30) -> str:
        """The last lines of the process's log."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    async def wait_exit(self, timeout_s: float) -> bool:
        """Whether the process exited within `timeout_s` seconds."""
        assert self.popen is not None
        try:
            await asyncio.to_thread(self.popen.wait, timeout_s)
        except subprocess.TimeoutExpired:
            return False
        return True

    async def stop(self, sig: int = signal.SIGTERM) -> None:
        """Send `sig`, then SIGKILL when the process has not exited within STOP_TIMEOUT_S."""
        if self.popen is None or self.popen.poll() is not None:
            return
        self.popen.send_signal(sig)
        if not await self.wait_exit(STOP_TIMEOUT_S):
            log(f"{self.name} did not exit {STOP_TIMEOUT_S:g} s after signal {sig}: killing it")
            self.kill_now()

    def kill_now(self) -> None:
        """SIGKILL at once (the last resort on the way out)."""
        if self.popen is not None and self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait()


def clean_env(extra: Mapping[str, str]) -> dict[str, str]:
    """This environment without the developer's AETR_* settings, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AETR_")}
    env.update(extra)
    return env


class AetrServer(Process):
    """The real `aetr serve` on a loopback port and one database."""

    def __init__(self, database_url: str, log_path: Path, settings: Mapping[str, str], standin: bool = False) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        aetr = Path(sys.executable).parent / "aetr"
        command = [str(aetr)] if aetr.exists() else [sys.executable, "-m", "aetr.cli.main"]
        if standin:  # the in-memory floor (benchmarks/standin.py) in aetr's place
            command = [sys.executable, "-m", "benchmarks.standin"]
        env = clean_env({"AETR_DATABASE_URL": database_url, **settings})
        super().__init__("aetr serve", [*command, "serve", "--port", str(self.port)], env, log_path)
        self._sandbox_pids: set[int] = set()

    async def start_ready(self, http: aiohttp.ClientSession) -> None:
        """Start the server and wait until GET /healthz answers 200 (RuntimeError with its log otherwise)."""
        self.start()
        deadline = time.monotonic() + READY_TIMEOUT_S
        last = "no answer"
        while time.monotonic() < deadline:
            if not self.running:
                raise RuntimeError(f"aetr serve exited while starting; its log:\n{self.tail()}")
            try:
                async with http.get(f"{self.url}/healthz", timeout=aiohttp.ClientTimeout(total=2)) as resp:
                    if resp.status == 200:
                        # A call process has a core's share of its own, as on a machine FACTOR times slower.
                        for pid in self.call_pids():
                            slower.place(pid, "aetr-calls")
                        return
                    last = f"HTTP {resp.status}"
            except (aiohttp.ClientError, TimeoutError) as exc:
                last = type(exc).__name__
            await asyncio.sleep(PROBE_INTERVAL_S)
        raise RuntimeError(f"aetr serve did not answer /healthz within {READY_TIMEOUT_S:g} s ({last}); "
                           f"its log:\n{self.tail()}")

    def aetr_pids(self) -> list[int]:
        """The processes serving AETR: the server, and its worker processes when it runs several."""
        return [self.pid, *(pid for pid in children_of(self.pid) if is_worker_process(pid))]

    def sample_children(self) -> None:
        """Remember the sandbox workers running now (they may have exited by the time we stop)."""
        if self.running:
            self._sandbox_pids.update(pid for parent in self.aetr_pids() for pid in children_of(parent)
                                      if is_sandbox_worker(pid))

    def call_pids(self) -> list[int]:
        """The call processes of the processes serving AETR (none with AETR_STEP_CALLS=inline)."""
        return [pid for parent in self.aetr_pids() for pid in children_of(parent) if is_call_process(pid)]

    def sandbox_pids(self) -> set[int]:
        """The sandbox workers seen so far."""
        return set(self._sandbox_pids)

    def peak_rss_mb(self) -> float:
        """The peak RSS of the processes serving AETR, added up (one process unless it runs workers)."""
        return sum(mb for pid in self.aetr_pids() if (mb := peak_rss_mb(pid)) is not None)

    def sandbox_peak_rss_mb(self) -> dict[str, float]:
        """Peak RSS of each sandbox worker process still alive, by pid."""
        self.sample_children()
        return {str(pid): round(mb, 1) for pid in sorted(self._sandbox_pids)
                if (mb := peak_rss_mb(pid)) is not None}

    async def stop(self, sig: int = signal.SIGTERM) -> None:
        """Stop the server, then any sandbox worker it left behind."""
        self.sample_children()
        await super().stop(sig)
        for pid in self._sandbox_pids:
            kill_if_sandbox_worker(pid)


class StepServiceProcess(Process):
    """benchmarks/stepsvc.py in its own process, with a client for its control routes."""

    def __init__(self, log_path: Path, callers: int) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        script = Path(__file__).resolve().parent / "stepsvc.py"
        super().__init__("stepsvc", [sys.executable, str(script), "--port", str(self.port), "--pool", str(callers)],
                         clean_env({}), log_path)

    async def start_ready(self) -> None:
        """Start and wait until it accepts connections."""
        self.start()
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            if not self.running:
                raise RuntimeError(f"stepsvc exited while starting; its log:\n{self.tail()}")
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", self.port)
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"stepsvc does not listen after {READY_TIMEOUT_S:g} s") from None
                await asyncio.sleep(PROBE_INTERVAL_S)
                continue
            writer.close()
            await writer.wait_closed()
            return

    async def wait(self, http: aiohttp.ClientSession, timeout_s: float, *, requests: int | None = None,
                   accepted: int | None = None) -> dict[str, int]:
        """Wait until the service has seen `requests` step requests and `accepted` accepted callbacks.

        TimeoutError (with the counters reached) after `timeout_s` seconds.
        """
        params = {"timeout": f"{timeout_s:.3f}"}
        if requests is not None:
            params["requests"] = str(requests)
        if accepted is not None:
            params["accepted"] = str(accepted)
        async with http.get(f"{self.url}/wait", params=params,
                            timeout=aiohttp.ClientTimeout(total=timeout_s + 30)) as resp:
            counts: dict[str, int] = orjson.loads(await resp.read())
            if resp.status == 408:
                raise TimeoutError(f"after {timeout_s:g} s the step service has {counts}; wanted "
                                   f"requests={requests} accepted={accepted}")
            return counts

    async def stats(self, http: aiohttp.ClientSession) -> dict[str, Any]:
        """Everything the service recorded."""
        async with http.get(f"{self.url}/stats", timeout=aiohttp.ClientTimeout(total=120)) as resp:
            resp.raise_for_status()
            stats: dict[str, Any] = orjson.loads(await resp.read())
            return stats

    async def gate(self, http: aiohttp.ClientSession, closed: bool) -> dict[str, int]:
        """Hold the callbacks from now on (`closed`), or send the held ones and stop holding: how many were
        released, and when (the service's time.time_ns())."""
        async with http.post(f"{self.url}/gate", params={"closed": "1" if closed else "0"},
                             timeout=aiohttp.ClientTimeout(total=30)) as resp:
            resp.raise_for_status()
            answer: dict[str, int] = orjson.loads(await resp.read())
            return answer

    async def reset(self, http: aiohttp.ClientSession) -> None:
        """Forget what was recorded so far (warm-up traffic)."""
        async with http.post(f"{self.url}/reset", timeout=aiohttp.ClientTimeout(total=30)) as resp:
            resp.raise_for_status()


class Profiler(Process):
    """py-spy recording one process until stopped."""

    def __init__(self, target_pid: int, output: Path, fmt: str, flags: list[str], log_path: Path) -> None:
        spy = Path(sys.executable).parent / "py-spy"
        args = [str(spy) if spy.exists() else "py-spy", "record", "--pid", str(target_pid), "--format", fmt,
                "--output", str(output), *flags]
        super().__init__("py-spy", args, clean_env({}), log_path)
        self.output = output

    async def finish(self) -> None:
        """Stop sampling and let py-spy write its output (SIGINT is how it is told to)."""
        if self.popen is None or self.popen.poll() is not None:
            return
        self.popen.send_signal(signal.SIGINT)
        if not await self.wait_exit(PROFILER_STOP_TIMEOUT_S):
            log(f"py-spy did not finish writing {self.output} within {PROFILER_STOP_TIMEOUT_S:g} s: killing it")
            self.kill_now()
        else:
            log(f"profile written to {self.output}")
