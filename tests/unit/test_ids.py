"""Run node ids: UUIDs (the API's contract) that sort by the time their run was made."""

from __future__ import annotations

import itertools
import uuid

import pytest

from aetr.domain import ids
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


# Short ids for people (aetr.domain.ids)


def test_runs_of_one_minute_are_shown_by_as_much_of_their_id_as_tells_them_apart() -> None:
    same_minute = ["01a23caf-e0d5-789a-be48-e21a20e7f25d", "01a23caf-e775-70ac-9fd3-d8b698495148",
                   "01a23caf-e777-70ac-9fd3-d8b698495149", "01a23ca6-e0c3-73f8-b1e2-17ca77c2c3c1"]
    shown = ids.run_prefixes(same_minute)
    assert shown == {same_minute[0]: "01a23caf-e0", same_minute[1]: "01a23caf-e775",
                     same_minute[2]: "01a23caf-e777", same_minute[3]: "01a23ca6"}
    assert ids.run_prefixes(same_minute[:1]) == {same_minute[0]: "01a23caf"}
    # Never cut just after a hyphen: the next character is what differs.
    assert ids.run_prefixes(["01a23caf-0000-7000-8000-000000000000", "01a23caf-1000-7000-8000-000000000000"]) == {
        "01a23caf-0000-7000-8000-000000000000": "01a23caf-0", "01a23caf-1000-7000-8000-000000000000": "01a23caf-1"}


def test_nodes_of_one_run_are_shown_by_the_end_of_their_id() -> None:
    nodes = list(itertools.islice(time_ordered_ids(), 200))
    shown = ids.node_tails(nodes)
    assert len(set(shown.values())) == len(nodes)
    assert all(node.endswith(tail) and len(tail) >= ids.NODE_TAIL_CHARS for node, tail in shown.items())
    twins = ["01a23caf-e0d5-789a-be48-aaaa12345678", "01a23caf-e0d5-789a-be48-bbbb12345678"]
    assert ids.node_tails(twins) == {twins[0]: "a12345678", twins[1]: "b12345678"}


@pytest.mark.parametrize(("given", "normal"), [
    ("01a2", "01a2"), ("01A23CAF", "01a23caf"), ("01a23cafe7", "01a23caf-e7"), ("01a23caf-e7", "01a23caf-e7"),
    ("01a23caf-e775-70ac-9fd3-d8b698495148", "01a23caf-e775-70ac-9fd3-d8b698495148"),
    ("01a", None), ("01a23cag", None), ("", None), ("0" * 33, None)])
def test_a_typed_prefix_is_made_like_a_stored_id_or_refused(given: str, normal: str | None) -> None:
    assert ids.normal_prefix(given) == normal


def test_the_ids_a_prefix_names_are_one_range() -> None:
    assert ids.prefix_bounds("01a23caf") == ("01a23caf", "01a23cb0")
    assert ids.prefix_bounds("01a23cff-ff") == ("01a23cff-ff", "01a23d00-00")
    assert ids.prefix_bounds("ffff-ffff") == ("ffff-ffff", None)
    made = list(itertools.islice(time_ordered_ids(), 50))
    for run_id in made:
        for length in (4, 8, 11, 20, 36):
            prefix = ids.normal_prefix(run_id[:length])
            assert prefix is not None
            low, high = ids.prefix_bounds(prefix)
            inside = {i for i in made if low <= i and (high is None or i < high)}
            assert inside == {i for i in made if i.startswith(prefix)}
