"""Run node ids: UUIDs (the API's contract) that sort by the time their run was made."""

from __future__ import annotations

import itertools
import uuid

import pytest

from aetr.engine import coordinator
from aetr.engine.coordinator import time_ordered_ids


def test_ids_are_version_7_uuids_and_never_repeat() -> None:
    ids = list(itertools.islice(time_ordered_ids(), 5000))  # several draws of randomness
    assert len(set(ids)) == len(ids)
    for text in ids:
        parsed = uuid.UUID(text)
        assert str(parsed) == text  # the canonical lowercase form
        assert parsed.version == 7
        assert parsed.variant == uuid.RFC_4122


def test_a_later_run_ids_sort_after_an_earlier_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    now_ns = [1_800_000_000_000 * 1_000_000]
    monkeypatch.setattr(coordinator.time, "time_ns", lambda: now_ns[0])
    earlier = list(itertools.islice(time_ordered_ids(), 100))
    now_ns[0] += 1_000_000  # one millisecond later
    later = list(itertools.islice(time_ordered_ids(), 100))
    assert max(earlier) < min(later)
    # The millisecond is the id's first 48 bits.
    assert uuid.UUID(earlier[0]).int >> 80 == 1_800_000_000_000
