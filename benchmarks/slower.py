"""`--slower FACTOR`: run the benchmark as a machine whose cores are FACTOR times slower would.

Every process the benchmark measures runs in a CPU cgroup of its own, capped at 1/FACTOR of a core by the
kernel's CFS bandwidth control: the driver (so `calibration_ms` reads FACTOR times higher, as it would on that
machine), `aetr serve`, the step service, the stand-in, Celery's worker. PostgreSQL's processes share one group
capped at (cores)/FACTOR, and so do Redis's when the peers run. A process that a capped one starts (a sandbox
worker, a second uvicorn worker) shares its parent's cap. All these groups are inside one capped at the
machine's cores made FACTOR times slower, so that together they never get more than that machine would have.

What it does not slow: the disk (an fsync takes what it takes here), memory bandwidth, and the kernel's own
work on behalf of a process beyond its time slice. The quota is given out in periods of 5 ms (the kernel's
bandwidth slice; shorter periods gave less than the quota asked): a process at its cap runs 5/FACTOR ms of
every 5, so it may wait up to 5 - 5/FACTOR ms at once where a slower core would spread that wait evenly.

It needs write access to a cgroup CPU controller: cgroup v1's `/sys/fs/cgroup/cpu` (cpu.cfs_quota_us) or cgroup
v2's unified hierarchy with the `cpu` controller (cpu.max); in practice, root. Without it the benchmark stops
before starting anything and says why.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from benchmarks.procstat import processes

PERIOD_US: Final = 5_000  # the CFS bandwidth period of every group (the kernel's default slice is 5 ms)
MIN_QUOTA_US: Final = 1_000  # the kernel refuses a smaller quota
GROUP_PREFIX: Final = "aetr-bench-slower"
V1_ROOT: Final = Path("/sys/fs/cgroup/cpu")
V2_ROOT: Final = Path("/sys/fs/cgroup")

_active: Slowdown | None = None


class SlowdownError(Exception):
    """The cgroups cannot be set up here; the message says why."""


def find_controller(v1: Path = V1_ROOT, v2: Path = V2_ROOT) -> tuple[Path, int]:
    """(the root of a writable CPU controller, its cgroup version), or SlowdownError."""
    if (v1 / "cpu.cfs_quota_us").exists() or (v1 / "tasks").exists():
        if os.access(v1, os.W_OK):
            return v1, 1
        raise SlowdownError(f"--slower needs write access to {v1} (cgroup v1's CPU controller): run as root")
    controllers = v2 / "cgroup.controllers"
    if controllers.exists():
        if "cpu" not in controllers.read_text().split():
            raise SlowdownError(f"--slower needs the cpu controller in {v2}, which offers: "
                                f"{controllers.read_text().strip() or 'none'}")
        if not os.access(v2, os.W_OK):
            raise SlowdownError(f"--slower needs write access to {v2} (cgroup v2): run as root")
        return v2, 2
    raise SlowdownError("--slower needs a cgroup CPU controller (cgroup v1 or v2), and none is mounted here")


@dataclass
class Slowdown:
    """The groups made for one benchmark run: one for the whole machine, capped at its cores made FACTOR times
    slower, and in it one for each process (or service) placed, capped at a share of a core; removed by close().
    """

    factor: float
    root: Path
    version: int
    cores: int = field(default_factory=lambda: os.cpu_count() or 1)
    groups: list[Path] = field(default_factory=list)
    machine: Path = field(init=False)

    def __post_init__(self) -> None:
        if not 1.0 <= self.factor <= PERIOD_US / MIN_QUOTA_US:
            raise SlowdownError(f"--slower takes a factor from 1 to {PERIOD_US // MIN_QUOTA_US}, not {self.factor:g}")
        # Each process at 1/FACTOR of a core, and all of them together at most the slower machine's cores: where
        # the benchmark's processes would keep more cores busy than it has, they share them, as they would there.
        self.machine = self._group(self.root, f"{GROUP_PREFIX}-{os.getpid()}", self.cores)

    def _group(self, parent: Path, name: str, cores: float) -> Path:
        if self.version == 2:  # a group's children get the cpu controller only when it hands it down
            control = parent / "cgroup.subtree_control"
            if not control.exists() or "cpu" not in control.read_text().split():
                control.write_text("+cpu")
        group = parent / name
        group.mkdir()
        self.groups.append(group)
        quota = self.quota_us(cores)
        if self.version == 1:
            (group / "cpu.cfs_period_us").write_text(str(PERIOD_US))
            (group / "cpu.cfs_quota_us").write_text(str(quota))
        else:
            (group / "cpu.max").write_text(f"{quota} {PERIOD_US}")
        return group

    def quota_us(self, cores: float) -> int:
        """The quota of a group allowed `cores` of these cores' time, FACTOR times slower."""
        return max(MIN_QUOTA_US, round(PERIOD_US * cores / self.factor))

    def cap(self, pids: list[int], name: str, cores: float = 1.0) -> Path:
        """Put `pids` in a new group capped at `cores` FACTOR-times-slower cores; the group's path."""
        group = self._group(self.machine, f"{len(self.groups)}-{name}", cores)
        for pid in pids:
            try:
                (group / "cgroup.procs").write_text(str(pid))
            except ProcessLookupError:  # it exited meanwhile
                continue
        return group

    def close(self) -> None:
        """Move every process still in a group back to the root, and remove the groups (children first)."""
        for group in reversed(self.groups):
            try:
                pids = (group / "cgroup.procs").read_text().split()
            except FileNotFoundError:
                continue
            for pid in pids:
                with contextlib.suppress(OSError):  # gone meanwhile
                    (self.root / "cgroup.procs").write_text(pid)
            with contextlib.suppress(OSError):
                group.rmdir()
        self.groups.clear()


def start(factor: float) -> Slowdown:
    """Make FACTOR the slowdown of every process placed from now on (place()), the caller's own included."""
    global _active
    root, version = find_controller()
    slowdown = Slowdown(factor, root, version)
    slowdown.cap([os.getpid()], "driver")
    _active = slowdown
    return slowdown


def stop() -> None:
    """Undo start()."""
    global _active
    if _active is not None:
        _active.close()
        _active = None


def place(pid: int, name: str, cores: float = 1.0) -> None:
    """Cap a process the benchmark started (no-op without --slower)."""
    if _active is not None:
        _active.cap([pid], name, cores)


def service_processes(command: str) -> list[int]:
    """The processes of a running service by its command name (`postgres`, `redis-server`), with every process
    they started: PostgreSQL's postmaster, its backends and helpers."""
    table = processes()
    mains = [pid for pid, (name, parent) in table.items()
             if name == command and table.get(parent, ("", 0))[0] != command]
    children: dict[int, list[int]] = {}
    for pid, (_, parent) in table.items():
        children.setdefault(parent, []).append(pid)
    found, todo = [], list(mains)
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def place_service(command: str) -> int:
    """Cap a running service with everything it started, together, at the machine's cores made FACTOR times
    slower (the processes it starts later inherit the group); how many processes were placed."""
    if _active is None:
        return 0
    pids = service_processes(command)
    if pids:
        _active.cap(pids, command, cores=_active.cores)
    return len(pids)
