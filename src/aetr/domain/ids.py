"""Short forms of run and node ids for people, and the id prefixes they type back.

Ids are UUIDv7 (aetr.engine.coordinator.time_ordered_ids): their first 12 hex digits are the millisecond the
run was made, so the runs of one minute share their first 8 characters and the nodes of one run share their
first 15. A run is therefore shown by the start of its id, long enough to tell it from the other runs shown;
a node by the end of its id, which is random.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Final

__all__ = [
    "ID_CHARS",
    "MIN_PREFIX_DIGITS",
    "NODE_TAIL_CHARS",
    "RUN_PREFIX_CHARS",
    "RUN_TIME_CHARS",
    "node_tails",
    "normal_prefix",
    "prefix_bounds",
    "run_prefixes",
]

ID_CHARS: Final = 36  # a whole id, 32 hex digits and 4 hyphens
HYPHENS_AT: Final = (8, 12, 16, 20)  # hex digits before each hyphen of a whole id
MIN_PREFIX_DIGITS: Final = 4  # shorter prefixes match nearly every id there is
RUN_PREFIX_CHARS: Final = 8  # the shortest start of a run's id shown
RUN_TIME_CHARS: Final = 13  # "01a23b06-1a2b": the millisecond a run was made, where a run is shown alone
NODE_TAIL_CHARS: Final = 8  # the end of a node's id shown (random digits)
_HEX: Final = frozenset("0123456789abcdef")


def _with_hyphens(digits: str) -> str:
    """Hex digits of an id's start, with the hyphens a whole id has at their places."""
    parts, start = [], 0
    for end in HYPHENS_AT:
        if len(digits) <= end:
            break
        parts.append(digits[start:end])
        start = end
    parts.append(digits[start:])
    return "-".join(parts)


def normal_prefix(text: str) -> str | None:
    """The start of an id as ids are stored (lowercase, hyphens at their places; hyphens may be left out), or
    None when `text` is not at least MIN_PREFIX_DIGITS hex digits and at most a whole id."""
    digits = text.strip().replace("-", "").lower()
    if not MIN_PREFIX_DIGITS <= len(digits) <= 32 or not set(digits) <= _HEX:
        return None
    return _with_hyphens(digits)


def prefix_bounds(prefix: str) -> tuple[str, str | None]:
    """(low, high): the ids that start with `prefix` (as normal_prefix gives it) are those with
    low <= id < high, a range an index on the id answers; high is None when no id is above the prefix."""
    digits = prefix.replace("-", "")
    if set(digits) == {"f"}:
        return prefix, None
    after = f"{int(digits, 16) + 1:0{len(digits)}x}"
    return prefix, _with_hyphens(after)


def _common(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def run_prefixes(ids: Iterable[str]) -> dict[str, str]:
    """Each run id's shortest start (at least RUN_PREFIX_CHARS characters, never ending on a hyphen) that no
    other of `ids` shares."""
    ordered = sorted(set(ids))
    shown: dict[str, str] = {}
    for i, run_id in enumerate(ordered):
        shared = max(_common(run_id, ordered[j]) for j in (i - 1, i + 1) if 0 <= j < len(ordered)) \
            if len(ordered) > 1 else 0
        length = max(RUN_PREFIX_CHARS, shared + 1)
        if length < len(run_id) and run_id[length - 1] == "-":
            length += 1
        shown[run_id] = run_id[:length]
    return shown


def node_tails(ids: Sequence[str]) -> dict[str, str]:
    """Each node id's shortest end (at least NODE_TAIL_CHARS characters) that no other of `ids` shares; the whole
    id when its last group is not enough."""
    reversed_ids = run_prefixes(i[::-1] for i in ids)
    shown: dict[str, str] = {}
    for node_id in ids:
        tail = reversed_ids[node_id[::-1]][::-1].lstrip("-")
        shown[node_id] = node_id if len(tail) >= 12 else tail
    return shown
