"""The map, choice and wait kinds: their data flow, limits and failures, checked without any I/O."""

from __future__ import annotations

from typing import Any

from aetr.domain import decide
from aetr.domain.kinds import ChoiceSpec, MapSpec, WaitSpec
from aetr.domain.steps import StepConfig, StepTree
from tests.unit.memory_store import MemoryStore
from tests.unit.test_decide import api, by_name, dispatched, par, seq, step_output, succeed

SCRIPTS = {
    "products": lambda args: args[0]["products"],
    "not-a-list": lambda args: {"oops": 1},
    "with-index": lambda args: {"item": args[0], "n": args[1]["index"]},
    "big": lambda args: args[0]["total"] > 1000,
    "small": lambda args: args[0]["total"] <= 1000,
    "maybe": lambda args: "yes",
    "boom": lambda args: (_ for _ in ()).throw(RuntimeError("Error: boom")),
    "sum": lambda args: sum(o for o in args[0] if o is not None),
    "later": lambda args: "2026-01-01T00:10:00Z",
    "past": lambda args: 0,
    "gibberish": lambda args: "next tuesday",
}


def map_(name: str, child: StepTree, mapper: str | None = None, **kw: Any) -> StepTree:
    return StepTree(StepConfig(name=name, spec=MapSpec(**kw)), ((mapper, child),))


def choice_(name: str, *links: tuple[str | None, StepTree]) -> StepTree:
    return StepTree(StepConfig(name=name, spec=ChoiceSpec(conditions=tuple(w for w, _ in links))),
                    tuple((None, child) for _, child in links))


def wait_(name: str, **kw: Any) -> StepTree:
    return StepTree(StepConfig(name=name, spec=WaitSpec(**kw)))


def items_of(store: MemoryStore, map_id: str) -> list[Any]:
    return sorted((n for n in store.nodes.values() if n.parent_id == map_id), key=lambda n: n.position)


def test_a_map_runs_its_child_once_per_item_and_reduces_in_item_order() -> None:
    store = MemoryStore(SCRIPTS)
    root = store.start(map_("m", api("resize"), mapper="with-index", items="products"),
                       {"products": ["a", "b", "c"]})
    kids = items_of(store, root)
    assert [k.input for k in kids] == [{"item": i, "n": n} for n, i in enumerate("abc")]
    assert store.nodes[root].n_children == 3
    for kid in reversed(kids):
        succeed(store, kid.id)
    assert store.nodes[root].state == "complete"
    assert store.nodes[root].output == [step_output("resize", k.input) for k in kids]


def test_a_map_over_an_empty_list_completes_at_once_with_its_reducer_of_nothing() -> None:
    store = MemoryStore(SCRIPTS)
    root = store.start(map_("m", api("x")), [])
    assert store.nodes[root].state == "complete" and store.nodes[root].output == []
    assert items_of(store, root) == []


def test_a_map_whose_items_are_not_a_list_fails_saying_what_it_got() -> None:
    store = MemoryStore(SCRIPTS)
    root = store.start(map_("m", api("x"), items="not-a-list"), 1)
    error = store.nodes[root].error
    assert error is not None and error["kind"] == "mapper"
    assert error["message"] == "a map needs an array of items, but its items script returned an object"
    bare = store.start(map_("m", api("x")), "text")
    assert store.nodes[bare].error["message"] == "a map needs an array of items, but its input is a string"  # type: ignore[index]


def test_a_map_item_may_be_a_whole_subtree_and_maps_nest() -> None:
    store = MemoryStore(SCRIPTS)
    tree = map_("outer", map_("inner", seq("s", api("a"), api("b"))))
    root = store.start(tree, [[1, 2], [], [3]])
    while ready := dispatched(store):
        succeed(store, ready[0], {"done": store.nodes[ready[0]].input})
    assert store.nodes[root].state == "complete"
    assert store.nodes[root].output == [[{"done": {"done": 1}}, {"done": {"done": 2}}], [], [{"done": {"done": 3}}]]


def test_max_concurrency_keeps_at_most_that_many_items_unfinished_and_starts_them_in_item_order() -> None:
    store = MemoryStore(SCRIPTS, count_later=True)
    root = store.start(map_("m", api("x"), max_concurrency=2), list(range(6)))
    started: list[int] = []
    while ready := dispatched(store):
        assert len(ready) <= 2
        pending = [k for k in items_of(store, root) if k.state == "pending"]
        assert all(k.started_at is None for k in pending)
        node = store.nodes[ready[-1]]
        started.append(node.input)
        succeed(store, node.id, node.input * 10)
    assert store.nodes[root].output == [0, 10, 20, 30, 40, 50]
    assert sorted(started) == list(range(6))


def test_tolerated_failures_let_the_map_complete_with_null_for_each_failed_item() -> None:
    store = MemoryStore(SCRIPTS)
    root = store.start(map_("m", seq("item", api("x"), api("y")), tolerated_failures="50%", reducer="sum"),
                       [1, 2, 3, 4])
    kids = items_of(store, root)
    fail_ids = [n.id for n in store.nodes.values() if n.step.name == "x" and n.input in (2, 4)]
    for node_id in fail_ids:
        store.event(node_id, lambda plan, i=node_id: decide.attempt_failed(plan, i, 1, "bad", "http", False))
    assert store.nodes[root].state == "executing"
    assert [store.nodes[k.id].state for k in kids] == ["executing", "error", "executing", "error"]
    ys = [n for n in store.nodes.values() if n.step.name == "y"]
    assert sorted(n.state for n in ys) == ["cancelled", "cancelled", "pending", "pending"]
    while ready := dispatched(store):
        succeed(store, ready[0], store.nodes[ready[0]].input)
    assert store.nodes[root].state == "complete"
    assert store.nodes[root].output == 1 + 3


def test_one_failure_more_than_tolerated_fails_the_map_and_cancels_unfinished_items() -> None:
    store = MemoryStore(SCRIPTS)
    root = store.start(map_("m", api("x"), tolerated_failures=1), [1, 2, 3])
    kids = items_of(store, root)
    fail_for_good_node(store, kids[0].id)
    assert store.nodes[root].state == "executing"
    fail_for_good_node(store, kids[1].id, "second")
    assert store.nodes[root].state == "error"
    assert store.nodes[root].error["node_id"] == kids[1].id  # type: ignore[index]
    assert store.nodes[kids[2].id].state == "cancelled"


def fail_for_good_node(store: MemoryStore, node_id: str, message: str = "boom") -> None:
    attempt = store.nodes[node_id].attempt
    store.event(node_id, lambda plan: decide.attempt_failed(plan, node_id, attempt, message, "http", False))


def test_redrive_of_a_map_reruns_only_the_items_that_did_not_complete() -> None:
    store = MemoryStore(SCRIPTS)
    root = store.start(map_("m", api("x"), mapper="with-index", max_concurrency=2), ["a", "b", "c", "d"])
    kids = items_of(store, root)
    succeed(store, kids[0].id, "A")
    fail_for_good_node(store, kids[1].id)
    assert store.nodes[root].state == "error"
    assert [store.nodes[k.id].state for k in kids] == ["complete", "error", "cancelled", "cancelled"]
    store.event(root, lambda plan: decide.redrive(plan, root))
    assert [store.nodes[k.id].state for k in kids] == ["complete", "executing", "executing", "pending"]
    while ready := dispatched(store):
        succeed(store, ready[0], store.nodes[ready[0]].input["item"].upper())
    assert store.nodes[root].output == ["A", "B", "C", "D"]
    assert store.nodes[kids[0].id].attempt == 1  # complete: kept, never called again


def test_a_choice_runs_the_first_child_whose_condition_is_true_and_skips_the_others() -> None:
    store = MemoryStore(SCRIPTS)
    tree = choice_("route", ("big", seq("review", api("manual"))), ("small", api("auto")), (None, api("fallback")))
    root = store.start(tree, {"total": 5000})
    states = {n.step.name: n.state for n in store.nodes.values()}
    assert states == {"route": "executing", "review": "executing", "manual": "executing", "auto": "skipped",
                      "fallback": "skipped"}
    succeed(store, by_name(store, "manual"), "reviewed")
    assert store.nodes[root].output == "reviewed"


def test_a_choice_with_no_match_completes_with_its_input_and_skips_every_child() -> None:
    store = MemoryStore(SCRIPTS)
    root = store.start(choice_("route", ("big", api("manual"))), {"total": 5})
    assert store.nodes[root].state == "complete" and store.nodes[root].output == {"total": 5}
    assert store.nodes[by_name(store, "manual")].state == "skipped"


def test_a_condition_that_is_not_strictly_boolean_fails_the_choice() -> None:
    store = MemoryStore(SCRIPTS)
    root = store.start(choice_("route", ("maybe", api("a")), (None, api("b"))), {})
    error = store.nodes[root].error
    assert error is not None and error["kind"] == "mapper"
    assert "returned a string, not true or false" in error["message"]
    assert store.nodes[by_name(store, "b")].state == "cancelled"


def test_a_timed_wait_completes_with_its_input_when_its_timer_fires() -> None:
    store = MemoryStore(SCRIPTS)
    root = store.start(seq("s", wait_("pause", seconds=900), api("after")), {"k": 1})
    pause = store.nodes[by_name(store, "pause")]
    assert pause.state == "executing" and pause.wait_until is not None
    assert (pause.wait_until - store.now).total_seconds() == 900
    (timer,) = store.timers()
    assert store.fire(timer).outcome == "accepted"
    assert store.nodes[by_name(store, "after")].input == {"k": 1}
    assert store.event(pause.id, lambda plan: decide.timer_fired(plan, pause.id, 1)).outcome == "refused"
    assert store.nodes[root].state == "executing"


def test_a_wait_of_zero_seconds_or_until_a_past_time_ends_at_once() -> None:
    store = MemoryStore(SCRIPTS)
    root = store.start(seq("s", wait_("now", seconds=0), wait_("past", until="past")), 3)
    assert store.nodes[root].state == "complete" and store.nodes[root].output == 3
    assert store.timers() == []


def test_until_a_time_arms_the_timer_for_that_time_and_garbage_fails_the_wait() -> None:
    store = MemoryStore(SCRIPTS)
    store.start(wait_("w", until="later"), 1)
    (timer,) = store.timers()
    assert timer.due_at.isoformat() == "2026-01-01T00:10:00+00:00"
    bad = store.start(wait_("w", until="gibberish"), 1)
    error = store.nodes[bad].error
    assert error is not None and error["kind"] == "mapper" and "not an ISO 8601 time" in error["message"]


def test_a_signal_wait_completes_with_the_signal_output_or_fails_with_its_error() -> None:
    store = MemoryStore(SCRIPTS)
    root = store.start(seq("s", wait_("approval", signal=True, timeout_s=60), api("ship")), 1)
    node = store.nodes[by_name(store, "approval")]
    assert node.state == "executing" and node.awaits_signal
    assert store.event(node.id, lambda plan: decide.signalled(plan, node.id, {"ok": True}, None)).outcome == "accepted"
    assert store.nodes[by_name(store, "ship")].input == {"ok": True}
    again = store.event(node.id, lambda plan: decide.signalled(plan, node.id, {"ok": False}, None))
    assert again.outcome == "refused"

    other = store.start(wait_("approval", signal=True), 1)
    store.event(other, lambda plan: decide.signalled(plan, other, None, "rejected: too expensive"))
    assert store.nodes[other].error == {"message": "rejected: too expensive", "kind": "signal", "node_id": other,
                                        "step": "approval"}
    assert store.nodes[root].state == "executing"


def test_a_signal_wait_nobody_answers_fails_as_a_timeout_and_a_timed_wait_takes_no_signal() -> None:
    store = MemoryStore(SCRIPTS)
    root = store.start(wait_("approval", signal=True, timeout_s=60), 1)
    (deadline,) = [w for w in store.work if w.kind == "deadline"]
    assert (deadline.due_at - store.now).total_seconds() == 60
    store.event(root, lambda plan: decide.deadline_passed(plan, root, deadline.attempt))
    error = store.nodes[root].error
    assert error is not None and error["kind"] == "timeout" and "timeout_s=60" in error["message"]
    timed = store.start(wait_("pause", seconds=5), 1)
    verdict = store.event(timed, lambda plan: decide.signalled(plan, timed, 1, None))
    assert verdict == decide.Verdict("refused", "node is a timed wait, not a signal wait")


def test_kinds_compose_under_a_parallel_parent() -> None:
    store = MemoryStore(SCRIPTS)
    tree = par("p", map_("m", wait_("w", seconds=0)), choice_("c", ("big", api("a"))), wait_("z", seconds=0))
    root = store.start(tree, {"total": 1})
    assert store.nodes[root].state == "error"  # the map's input is not a list
    assert {n.step.name: n.state for n in store.nodes.values()} == {"p": "error", "m": "error", "c": "cancelled",
                                                                     "a": "cancelled", "z": "cancelled"}
    tree2 = par("p", wait_("w", seconds=0), choice_("c", ("big", api("a"))))
    ok = store.start(tree2, {"total": 1})
    assert store.nodes[ok].output == [{"total": 1}, {"total": 1}]


def test_a_limited_map_whose_items_finish_as_they_start_runs_them_all_without_nesting_a_call_per_item() -> None:
    store = MemoryStore(SCRIPTS)
    root = store.start(map_("m", wait_("now", seconds=0), max_concurrency=2), list(range(3000)))
    while store.grows():
        store.grow(store.grows()[0])
    assert store.nodes[root].state == "complete"
    assert store.nodes[root].output == list(range(3000))


def test_a_long_sequence_of_children_that_finish_as_they_start_completes_without_nesting_a_call_per_child() -> None:
    store = MemoryStore(SCRIPTS)
    waits = store.start(seq("s", *[wait_(f"w{i}", seconds=0) for i in range(3000)]), {"k": 1})
    assert store.nodes[waits].state == "complete" and store.nodes[waits].output == {"k": 1}
    empty = store.start(seq("s", *[seq(f"e{i}") for i in range(3000)]), 2)
    assert store.nodes[empty].state == "complete" and store.nodes[empty].output == 2


def test_a_big_map_makes_its_items_a_batch_per_event_and_starts_each_batch_as_it_is_made() -> None:
    store = MemoryStore(SCRIPTS, batch=4)
    root = store.start(map_("m", api("x")), list(range(10)))
    assert len(items_of(store, root)) == 4 and store.nodes[root].n_children == 10
    assert len(dispatched(store)) == 4
    while store.grows():
        store.grow(store.grows()[0])
    assert len(items_of(store, root)) == 10 and len(dispatched(store)) == 10
    assert store.items == {}  # the kept items are forgotten once every batch is made
    for kid in items_of(store, root):
        succeed(store, kid.id, kid.input)
    assert store.nodes[root].output == list(range(10))


def test_a_limited_big_map_starts_items_made_later_when_their_turn_came_before_they_existed() -> None:
    store = MemoryStore(SCRIPTS, batch=2)
    root = store.start(map_("m", api("x"), max_concurrency=3), list(range(7)))
    assert [k.state for k in items_of(store, root)] == ["executing", "executing"]
    first = items_of(store, root)[0]
    succeed(store, first.id, 0)  # its slot goes to item 3, not made yet: item 2's batch starts it
    while store.grows():
        store.grow(store.grows()[0])
        assert len(dispatched(store)) <= 3
    assert [k.state for k in items_of(store, root)] == ["complete", "executing", "executing", "executing",
                                                         "pending", "pending", "pending"]
    while ready := dispatched(store):
        succeed(store, ready[0], store.nodes[ready[0]].input)
        assert len(dispatched(store)) <= 3
    assert store.nodes[root].output == list(range(7))


def test_a_big_map_that_fails_stops_making_items_and_its_redrive_makes_the_rest() -> None:
    store = MemoryStore(SCRIPTS, batch=2)
    root = store.start(map_("m", api("x")), list(range(6)))
    fail_for_good_node(store, items_of(store, root)[1].id)
    assert store.nodes[root].state == "error"
    assert store.grows() == []  # the map stopped making items
    assert len(items_of(store, root)) == 2
    store.event(root, lambda plan: decide.redrive(plan, root))
    while store.grows():
        store.grow(store.grows()[0])
    while ready := dispatched(store):
        succeed(store, ready[0], store.nodes[ready[0]].input)
    assert store.nodes[root].state == "complete" and store.nodes[root].output == list(range(6))
