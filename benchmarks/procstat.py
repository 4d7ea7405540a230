"""What /proc says about processes and the machine: CPU, memory, children. Standard library only, so that the
peers' own virtual environment (benchmarks/peers/celery_side.py) imports it as AETR's benchmarks do."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Final

CLOCK_TICKS: Final = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds the process has used so far; None when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def machine_busy_seconds() -> float:
    """CPU seconds all cores have spent busy since boot (from /proc/stat; idle and iowait excluded)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / CLOCK_TICKS


def processes() -> dict[int, tuple[str, int]]:
    """Every process now: its pid, its command name and its parent's pid."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):  # gone meanwhile
            stat = (entry / "stat").read_text()
            found[int(entry.name)] = (stat[stat.index("(") + 1:stat.rindex(")")],
                                      int(stat[stat.rindex(")") + 2:].split()[1]))
    return found


def children_of(pid: int) -> list[int]:
    """The pids whose parent is `pid` (an aetr process's sandbox workers, a prefork worker's pool)."""
    return [child for child, (_, parent) in processes().items() if parent == pid]
