"""`benchmarks/run --slower FACTOR`: the CPU cgroups that make each measured process FACTOR times slower."""

from __future__ import annotations

import resource
import subprocess
import sys
from pathlib import Path

import pytest
from benchmarks import slower
from benchmarks.slower import PERIOD_US, Slowdown, SlowdownError, find_controller


def v1_root(tmp_path: Path) -> Path:
    root = tmp_path / "cpu"
    root.mkdir(parents=True)
    (root / "cpu.cfs_quota_us").write_text("-1\n")
    (root / "cgroup.procs").write_text("")
    return root


def test_a_process_is_capped_at_a_factor_of_a_core_on_cgroup_v1(tmp_path: Path) -> None:
    root = v1_root(tmp_path)
    assert find_controller(v1=root, v2=tmp_path / "none") == (root, 1)
    slowdown = Slowdown(2.0, root, 1, cores=2)
    machine = slowdown.machine
    assert machine.parent == root
    assert (machine / "cpu.cfs_quota_us").read_text() == str(PERIOD_US)  # two half-speed cores: one core's time
    group = slowdown.cap([4242], "aetr-serve")
    assert group.parent == machine  # inside the machine's group: all together get no more than it
    assert (group / "cpu.cfs_period_us").read_text() == str(PERIOD_US)
    assert (group / "cpu.cfs_quota_us").read_text() == str(PERIOD_US // 2)  # half of each 5 ms period
    assert (group / "cgroup.procs").read_text() == "4242"
    shared = slowdown.cap([1, 2], "postgres", cores=2.0)
    assert (shared / "cpu.cfs_quota_us").read_text() == str(PERIOD_US)
    slowdown.close()
    assert (root / "cgroup.procs").read_text() == "4242"  # moved back to the root, the newest group's first
    assert slowdown.groups == []


def test_cgroup_v2_gets_cpu_max_and_the_controller_handed_down(tmp_path: Path) -> None:
    (tmp_path / "cgroup.controllers").write_text("cpuset cpu io memory\n")
    (tmp_path / "cgroup.subtree_control").write_text("memory\n")
    assert find_controller(v1=tmp_path / "no-v1", v2=tmp_path) == (tmp_path, 2)
    slowdown = Slowdown(1.6, tmp_path, 2, cores=2)
    assert (tmp_path / "cgroup.subtree_control").read_text() == "+cpu"
    assert (slowdown.machine / "cpu.max").read_text() == f"{round(PERIOD_US * 2 / 1.6)} {PERIOD_US}"
    group = slowdown.cap([7], "driver")
    assert (slowdown.machine / "cgroup.subtree_control").read_text() == "+cpu"
    assert (group / "cpu.max").read_text() == f"{round(PERIOD_US / 1.6)} {PERIOD_US}"


def test_no_usable_controller_or_factor_is_refused_with_the_reason(tmp_path: Path) -> None:
    (tmp_path / "cgroup.controllers").write_text("memory pids\n")
    with pytest.raises(SlowdownError, match="needs the cpu controller"):
        find_controller(v1=tmp_path / "no-v1", v2=tmp_path)
    with pytest.raises(SlowdownError, match="none is mounted"):
        find_controller(v1=tmp_path / "no-v1", v2=tmp_path / "no-v2")
    for factor in (0.5, 6.0):  # faster than the machine; a quota under the kernel's 1 ms
        with pytest.raises(SlowdownError, match="factor from 1 to 5"):
            Slowdown(factor, v1_root(tmp_path / str(factor)), 1)


SPIN = "import time\nend = time.monotonic() + 1.0\nwhile time.monotonic() < end: pass\n"


def test_a_capped_process_gets_no_more_than_its_share_of_a_core() -> None:
    """On this machine's real cgroups, where they can be written (as root): a process spinning for a second of
    wall time at --slower 2 gets about half a second of CPU, where it would get the whole second uncapped."""
    try:
        find_controller()
    except SlowdownError as exc:
        pytest.skip(str(exc))
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    with subprocess.Popen([sys.executable, "-c", SPIN]) as child:  # started uncapped, outside the driver's group
        started = slower.start(2.0)
        try:
            slower.place(child.pid, "spin")
        finally:
            child.wait()
            slower.stop()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_s = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    assert started.groups == []  # every group removed, this process moved back
    assert cpu_s <= 0.65  # of its 1 s: at most half a core, and its start-up uncapped
