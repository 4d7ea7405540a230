"""Summarise py-spy raw profiles: the top functions by own and total samples, and own samples by package.

Run with `.venv/bin/python -m benchmarks.profile_top PROFILE.txt [...] [--top N] [--match TEXT]`. The input
is what `py-spy record --format raw` writes (and `benchmarks/run --profile DIR` produces): one collapsed
stack per line, frames separated by `;`, then the sample count.

SQLAlchemy's asyncio layer runs statements in greenlets, so py-spy shows those stacks without their
asyncio callers: "total" percentages of engine and store functions undercount time spent inside
SQLAlchemy; the package breakdown of own samples does not have that blind spot.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^():]+)(?::\d+)?\)$")


@dataclass
class Profile:
    """Sample counts aggregated from collapsed stacks."""

    total: int = 0
    own: Counter[str] = field(default_factory=Counter)
    inclusive: Counter[str] = field(default_factory=Counter)
    packages: Counter[str] = field(default_factory=Counter)
    threads: Counter[str] = field(default_factory=Counter)

    def add(self, stack: list[str], count: int) -> None:
        """Count one collapsed stack `count` times."""
        thread = "?"
        if stack and stack[0].startswith("thread ("):
            thread = stack[0].split(":", 1)[-1].strip() or stack[0]
            stack = stack[1:]
        if not stack:
            return
        self.total += count
        self.threads[thread] += count
        names = [function_name(f) for f in stack]
        self.own[names[-1]] += count
        self.packages[package_of(stack[-1])] += count
        for name in set(names):
            self.inclusive[name] += count


def function_name(frame: str) -> str:
    """`func (path/file.py:12)` as `func (path/file.py)`: samples of one function add up across its lines."""
    m = FRAME.match(frame.strip())
    return f"{m['func']} ({m['file']})" if m else frame.strip()


def package_of(frame: str) -> str:
    """The top-level package of a frame's file (`sqlalchemy`, `aetr`, `asyncio`, ...)."""
    m = FRAME.match(frame.strip())
    if not m:
        return "(native)"
    path = m["file"]
    return path.split("/", 1)[0].removesuffix(".py") if "/" in path else path.removesuffix(".py")


def read(paths: Iterable[Path]) -> Profile:
    """Aggregate every profile in `paths`."""
    profile = Profile()
    for path in paths:
        for line in path.read_text(errors="replace").splitlines():
            stack, _, count = line.rpartition(" ")
            if stack and count.isdigit():
                profile.add(stack.split(";"), int(count))
    return profile


def report(profile: Profile, top: int, match: str | None) -> str:
    """The summary as text."""
    if not profile.total:
        return "no samples"
    pct = 100 / profile.total
    lines = [f"{profile.total} samples (non-idle threads)", "", "own samples by package:"]
    lines += [f"  {n * pct:5.1f}%  {name}" for name, n in profile.packages.most_common(top)]
    lines += ["", "threads:"] + [f"  {n * pct:5.1f}%  {name}" for name, n in profile.threads.most_common(5)]
    lines += ["", f"top {top} functions by own samples:"]
    lines += [f"  {n * pct:5.1f}%  {name}" for name, n in profile.own.most_common(top)]
    inclusive = [(name, n) for name, n in profile.inclusive.most_common()
                 if match is None or match in name][:top]
    lines += ["", f"top {top} functions by total samples{f' matching {match!r}' if match else ''}:"]
    lines += [f"  {n * pct:5.1f}%  {name}" for name, n in inclusive]
    return "\n".join(lines)


def main() -> None:
    """Print the summary of the profiles named on the command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("profiles", type=Path, nargs="+")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--match", help="only list functions whose name or file contains this, by total samples")
    args = parser.parse_args()
    print(report(read(args.profiles), args.top, args.match))


if __name__ == "__main__":
    main()
