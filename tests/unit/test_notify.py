"""Run-end notifications without I/O: when a run's end queues one, the CloudEvent it becomes, and its backoff."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import orjson
import pytest

from aetr.domain.kinds import ApiSpec
from aetr.domain.notify import Backoff, notification_id
from aetr.domain.runs import Node, Plan
from aetr.domain.steps import StepConfig
from aetr.engine.notifier import cloud_event, encode

NOW = datetime(2026, 3, 4, 5, 6, 7, 890000, tzinfo=UTC)
HOOK = "https://hooks.example.com/aetr"


def _node(**changes: object) -> Node:
    fields: dict[str, object] = {
        "id": "r1", "root_id": "r1", "parent_id": None, "position": 0, "mapper": None, "n_children": 0,
        "step": StepConfig(name="nightly", spec=ApiSpec(url="http://127.0.0.1:1/step"), id="s1", version=3),
        "created_at": NOW - timedelta(minutes=5), "state": "executing", "input": {"day": 4},
        "started_at": NOW - timedelta(minutes=4), "notify": HOOK}
    fields.update(changes)
    return Node(**fields)  # type: ignore[arg-type]


def _plan(*nodes: Node) -> Plan:
    plan = Plan(now=NOW)
    plan.absorb(nodes)
    return plan


@pytest.mark.parametrize("state", ["complete", "error", "cancelled"])
def test_a_run_that_ends_with_a_notify_url_queues_one_notification_due_at_once(state: str) -> None:
    plan = _plan(_node())
    root = plan.put(plan.nodes["r1"], state=state, completed_at=NOW)
    (row,) = [w for w in plan.work if w.kind == "notify"]
    assert (row.node_id, row.root_id, row.attempt, row.due_at) == (notification_id(root), "r1", 0, NOW)
    (line,) = [e for e in plan.events if e.kind == "notify"]
    assert line.data == {"outcome": "queued", "id": row.node_id, "url": HOOK, "step": "nightly"}


def test_the_queued_line_hides_a_password_in_the_notify_url() -> None:
    plan = _plan(_node(notify="https://bot:s3cret@hooks.example.com/aetr"))
    plan.put(plan.nodes["r1"], state="complete", completed_at=NOW)
    (line,) = [e for e in plan.events if e.kind == "notify"]
    assert line.data["url"] == "https://***@hooks.example.com/aetr"


def test_a_run_without_a_notify_url_or_a_node_below_the_root_queues_none() -> None:
    plan = _plan(_node(notify=None), _node(id="c1", parent_id="r1", notify=None))
    plan.put(plan.nodes["c1"], state="complete", completed_at=NOW)
    plan.put(plan.nodes["r1"], state="complete", completed_at=NOW)
    assert not plan.work
    assert not [e for e in plan.events if e.kind == "notify"]


def test_each_end_of_a_run_has_its_own_notification_id_and_every_try_of_one_end_the_same() -> None:
    first = _node(state="error", completed_at=NOW)
    again = _node(state="complete", completed_at=NOW + timedelta(minutes=1))
    assert notification_id(first) == notification_id(_node(state="error", completed_at=NOW))
    assert notification_id(first) != notification_id(again)


@pytest.mark.parametrize(("state", "kind"), [("complete", "completed"), ("error", "failed"),
                                               ("cancelled", "cancelled")])
def test_the_cloud_event_is_structured_json_naming_the_run_and_what_it_ended_with(state: str, kind: str) -> None:
    error = {"message": "boom", "kind": "http", "node_id": "r1", "step": "nightly"} if state == "error" else None
    root = _node(state=state, completed_at=NOW, output={"rows": 3} if state == "complete" else None, error=error)
    headers, body = encode(cloud_event(root, "https://aetr.example.com"))
    assert headers == {"content-type": "application/cloudevents+json"}
    event = orjson.loads(body)
    assert event == {
        "specversion": "1.0", "id": notification_id(root), "source": "https://aetr.example.com",
        "type": f"aetr.run.{kind}", "subject": "r1", "time": "2026-03-04T05:06:07.890000Z",
        "datacontenttype": "application/json",
        "data": {"id": "r1", "step": "nightly", "state": state, "output": root.output, "error": error,
                 "started_at": "2026-03-04T05:02:07.890000Z", "ended_at": "2026-03-04T05:06:07.890000Z"},
    }


def test_backoff_doubles_from_the_first_wait_up_to_its_cap() -> None:
    backoff = Backoff(first_s=1.0, max_s=300.0, window_s=3600.0)
    assert [backoff.wait_s(n) for n in range(1, 11)] == [1, 2, 4, 8, 16, 32, 64, 128, 256, 300]
    assert backoff.wait_s(10_000) == 300


def test_tries_go_on_until_the_window_after_the_end_has_passed() -> None:
    backoff = Backoff(first_s=1.0, max_s=300.0, window_s=3600.0)
    ended = NOW
    assert backoff.next_try(3, ended, ended + timedelta(seconds=10)) == ended + timedelta(seconds=14)
    late = ended + timedelta(seconds=3599)
    assert backoff.next_try(20, ended, late) == late + timedelta(seconds=300)  # a last try after the hour
    assert backoff.next_try(21, ended, ended + timedelta(seconds=3600)) is None
