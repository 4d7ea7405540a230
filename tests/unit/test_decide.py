"""The decide handlers: the data flow and error rules, checked without any I/O."""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from aetr.domain import decide
from aetr.domain.kinds import ApiSpec, ChoiceSpec, MapSpec, ParallelSpec, SequentialSpec, WaitSpec
from aetr.domain.runs import Plan
from aetr.domain.steps import RetryPolicy, StepConfig, StepTree
from tests.unit.memory_store import MemoryStore

SCRIPTS = {
    "wrap": lambda args: {"wrapped": args[0], "index": args[1]["index"]},
    "count": lambda args: len(args[0]),
    "boom": lambda args: (_ for _ in ()).throw(RuntimeError("Error: boom at line 1")),
    "pair": lambda args: [args[0], {"again": args[0]}],
    "nothing": lambda args: [],
    "yes": lambda args: True,
    "no": lambda args: False,
}


def api(name: str, **kw: Any) -> StepTree:
    return StepTree(StepConfig(name=name, spec=ApiSpec(url=f"http://127.0.0.1:1/{name}", **kw)))


def seq(name: str, *kids: StepTree | tuple[str | None, StepTree]) -> StepTree:
    return StepTree(StepConfig(name=name, spec=SequentialSpec()), tuple(_link(k) for k in kids))


def par(name: str, *kids: StepTree | tuple[str | None, StepTree], reducer: str = "array") -> StepTree:
    return StepTree(StepConfig(name=name, spec=ParallelSpec(reducer=reducer)), tuple(_link(k) for k in kids))


def _link(k: StepTree | tuple[str | None, StepTree]) -> tuple[str | None, StepTree]:
    return k if isinstance(k, tuple) else (None, k)


def step_output(name: str, value: Any) -> Any:
    return {"by": name, "in": value}


def model(tree: StepTree, value: Any, index: int = 0) -> Any:
    """A plain reading of the data-flow rules: what the root of `tree` outputs for input `value`."""
    c = tree.config
    if c.kind == "api":
        return step_output(c.name, value)
    mapped = lambda m, v, k: v if m is None else SCRIPTS[m]([v, {"index": k}])  # noqa: E731
    spec = c.spec
    if isinstance(spec, WaitSpec):
        return value
    if isinstance(spec, ChoiceSpec):
        for k, (m, child) in enumerate(tree.children):
            when = spec.conditions[k]
            if when is None or SCRIPTS[when]([value, {"index": k}]) is True:
                return model(child, mapped(m, value, k))
        return value
    if isinstance(spec, MapSpec):
        assert spec.items is not None
        m, child = tree.children[0]
        outs = [model(child, mapped(m, item, i)) for i, item in enumerate(SCRIPTS[spec.items]([value, {}]))]
        return decide.builtin_reduce(spec.reducer, outs) if spec.reducer != "count" else len(outs)
    if c.kind == "sequential":
        for k, (m, child) in enumerate(tree.children):
            value = model(child, mapped(m, value, k))
        return value
    outs = [model(child, mapped(m, value, k)) for k, (m, child) in enumerate(tree.children)]
    reducer = c.spec.reducer if isinstance(c.spec, ParallelSpec) else "array"
    return decide.builtin_reduce(reducer, outs) if reducer != "count" else len(outs)


def dispatched(store: MemoryStore) -> list[str]:
    """Node ids with a call queued whose node is still waiting for it."""
    return [w.node_id for w in store.work if w.kind == "dispatch" and store.nodes[w.node_id].state == "executing"]


def succeed(store: MemoryStore, node_id: str, output: Any = None) -> decide.Verdict:
    node = store.nodes[node_id]
    out = step_output(node.step.name, node.input) if output is None else output
    verdict: decide.Verdict = store.event(
        node_id, lambda plan: decide.step_succeeded(plan, node_id, node.attempt, out))
    return verdict


def by_name(store: MemoryStore, name: str) -> str:
    return next(n.id for n in store.nodes.values() if n.step.name == name)


@st.composite
def trees(draw: st.DrawFn) -> StepTree:
    counter = iter(range(10_000))

    def build(depth: int) -> StepTree:
        # Parents at every depth, the deepest ones empty: empty parents complete as they start, inside their
        # own parent's start, which is where a parallel parent once reduced over no outputs at all.
        kind = draw(st.sampled_from(["api", "api", "sequential", "parallel", "map", "choice", "wait"]))
        if kind == "api":
            return api(f"a{next(counter)}")
        if kind == "wait":
            return StepTree(StepConfig(name=f"w{next(counter)}", spec=WaitSpec(seconds=draw(st.sampled_from([0, 5])))))
        if kind == "map":  # zero or two items; a map holds one child link
            child = build(depth + 1) if depth < 3 else api(f"a{next(counter)}")
            spec = MapSpec(items=draw(st.sampled_from(["pair", "nothing"])), max_concurrency=draw(st.sampled_from(
                [None, 1])), reducer=draw(st.sampled_from(["array", "count"])))
            return StepTree(StepConfig(name=f"m{next(counter)}", spec=spec),
                            ((draw(st.sampled_from([None, "wrap"])), child),))
        kids = tuple((draw(st.sampled_from([None, None, "wrap"])), build(depth + 1))
                     for _ in range(draw(st.integers(0, 4 if depth < 3 else 0))))
        if kind == "sequential":
            return StepTree(StepConfig(name=f"s{next(counter)}", spec=SequentialSpec()), kids)
        if kind == "choice":  # conditions that hold or not, the last link sometimes the default
            conditions = [draw(st.sampled_from(["yes", "no", "no"])) for _ in kids]
            if conditions and draw(st.booleans()):
                conditions[-1] = None
            return StepTree(StepConfig(name=f"c{next(counter)}", spec=ChoiceSpec(conditions=tuple(conditions))),
                            tuple((None, child) for _, child in kids))
        reducer = draw(st.sampled_from(["array", "last", "merge", "count"]))
        return StepTree(StepConfig(name=f"p{next(counter)}", spec=ParallelSpec(reducer=reducer)), kids)

    return build(0)


@settings(max_examples=300, deadline=None)
@given(tree=trees(), run_input=st.integers() | st.text(max_size=5), order=st.randoms(use_true_random=False),
       counting=st.sampled_from(["in the event", "after the commit", "later"]), batch=st.sampled_from([1, 3, 1000]))
def test_root_output_matches_the_model_whatever_the_completion_order(tree: StepTree, run_input: Any,
                                                                    order: Any, counting: str, batch: int) -> None:
    store = MemoryStore(SCRIPTS, count_later=counting != "in the event", defer_counts=counting == "later",
                        batch=batch)
    store.scripts["count"] = lambda args: len(args[0])
    root = store.start(tree, run_input)
    while (ready := dispatched(store)) or store.complete_pending() or store.timers() or store.grows():
        if store.grows() and order.random() < 0.5:
            assert store.grow(order.choice(store.grows())).outcome == "accepted"
        elif ready and (not store.timers() or order.random() < 0.7):
            assert succeed(store, order.choice(ready)).outcome == "accepted"
        elif store.timers():
            assert store.fire(order.choice(store.timers())).outcome == "accepted"
        if order.random() < 0.3:
            store.complete_pending()
    try:
        expected = model(tree, run_input)
    except ValueError:  # 'merge' over a non-object output: the run must fail in its reducer
        error = store.nodes[root].error
        assert store.nodes[root].state == "error" and error is not None and error["kind"] == "reducer"
        assert all(n.terminal for n in store.nodes.values())
        return
    assert store.nodes[root].state == "complete"
    assert store.nodes[root].output == expected
    assert all(n.state in ("complete", "skipped") for n in store.nodes.values())


def test_branches_advance_independently() -> None:
    store = MemoryStore()
    store.start(par("p", seq("s", api("A1"), api("A2")), api("B")), 1)
    succeed(store, by_name(store, "A1"))
    assert store.nodes[by_name(store, "A2")].state == "executing"
    assert store.nodes[by_name(store, "B")].state == "executing"
    assert by_name(store, "A2") in dispatched(store)


def test_parallel_outputs_keep_child_order_whatever_completion_order() -> None:
    store = MemoryStore()
    root = store.start(par("p", api("x"), api("y"), api("z")), "in")
    for name in ("z", "x", "y"):
        succeed(store, by_name(store, name), name.upper())
    assert store.nodes[root].output == ["X", "Y", "Z"]


def test_empty_parents_complete_at_once() -> None:
    store = MemoryStore()
    root = store.start(seq("s", seq("e1"), par("e2", reducer="array"), par("e3", reducer="merge")), {"k": 1})
    assert store.nodes[root].state == "complete"
    assert store.nodes[root].output == {}
    assert store.nodes[by_name(store, "e2")].output == []


def test_a_parallel_parent_whose_children_complete_as_they_start_reduces_over_their_outputs() -> None:
    store = MemoryStore({"plus1": lambda args: args[0]["k"] + 1, "count": lambda args: {"n": len(args[0])}})
    outer = store.start(par("outer", par("inner1"), par("inner2")), {"k": 1})
    assert store.nodes[outer].output == [[], []]
    p5 = store.start(par("p5", seq("e1"), ("plus1", seq("e2"))), {"k": 1})
    assert store.nodes[p5].output == [{"k": 1}, 2]
    counted = store.start(par("c", seq("e3"), seq("e4"), reducer="count"), {"k": 1})
    assert store.nodes[counted].output == {"n": 2}


def test_duplicate_callback_is_reported_and_changes_nothing() -> None:
    store = MemoryStore()
    root = store.start(seq("s", api("a"), api("b")), 0)
    a = by_name(store, "a")
    assert succeed(store, a, {"x": 1}).outcome == "accepted"
    before = dict(store.nodes)
    assert succeed(store, a, {"x": 1}).outcome == "duplicate"
    assert succeed(store, a, {"x": 2}).outcome == "refused"
    assert store.nodes == before
    assert store.nodes[root].state == "executing"


def test_a_superseded_attempt_is_refused() -> None:
    store = MemoryStore()
    store.start(api("a", retry=RetryPolicy(max_attempts=3)), 0)
    a = by_name(store, "a")
    v = store.event(a, lambda plan: decide.attempt_failed(plan, a, 1, "503", "http", True))
    assert v.outcome == "accepted"
    assert store.nodes[a].attempt == 2
    late = store.event(a, lambda plan: decide.step_succeeded(plan, a, 1, "late"))
    assert late == decide.Verdict("refused", "attempt 1 was superseded by attempt 2")


def test_error_moves_up_and_cancels_unfinished_siblings() -> None:
    store = MemoryStore()
    root = store.start(seq("s", par("p", api("x"), seq("inner", api("y"), api("y2"))), api("after")), 0)
    x = by_name(store, "x")
    store.event(x, lambda plan: decide.attempt_failed(plan, x, 1, "HTTP 400: bad sku", "http", False))
    states = {n.step.name: n.state for n in store.nodes.values()}
    assert states == {"s": "error", "p": "error", "x": "error", "inner": "cancelled", "y": "cancelled",
                      "y2": "cancelled", "after": "cancelled"}
    assert store.nodes[root].error == {"message": "HTTP 400: bad sku", "kind": "http", "node_id": x, "step": "x"}
    assert dispatched(store) == []
    assert store.work == []


def test_a_throwing_mapper_fails_the_node_it_was_computing() -> None:
    store = MemoryStore(SCRIPTS)
    root = store.start(seq("s", api("a"), ("boom", api("b"))), 0)
    succeed(store, by_name(store, "a"))
    b = store.nodes[by_name(store, "b")]
    assert b.state == "error"
    assert b.error == {"message": "Error: boom at line 1", "kind": "mapper", "node_id": b.id, "step": "b"}
    assert store.nodes[root].error == b.error


def test_a_failing_reducer_fails_the_parallel_parent() -> None:
    store = MemoryStore()
    root = store.start(par("p", api("a"), api("b"), reducer="merge"), 0)
    succeed(store, by_name(store, "a"), {"k": 1})
    succeed(store, by_name(store, "b"), [1])
    assert store.nodes[root].state == "error"
    assert store.nodes[root].error is not None
    assert store.nodes[root].error["kind"] == "reducer"
    assert "child 1 returned an array" in store.nodes[root].error["message"]


def test_deadline_retries_then_fails_as_timeout() -> None:
    store = MemoryStore()
    root = store.start(api("a", timeout_s=5, retry=RetryPolicy(max_attempts=2, backoff_s=1)), 0)
    for attempt in (1, 2):
        store.event(root, lambda plan, att=attempt: decide.deadline_passed(plan, root, att))
    assert store.nodes[root].state == "error"
    assert store.nodes[root].error is not None
    assert store.nodes[root].error["kind"] == "timeout"


def test_retry_waits_with_exponential_backoff_capped() -> None:
    store = MemoryStore()
    root = store.start(api("a", retry=RetryPolicy(max_attempts=5, backoff_s=2, max_backoff_s=5)), 0)
    delays = []
    for attempt in (1, 2, 3):
        store.event(root, lambda plan, att=attempt: decide.attempt_failed(plan, root, att, "503", "http", True))
        due = next(w.due_at for w in store.work if w.kind == "dispatch")
        delays.append((due - store.now).total_seconds())
    assert delays == [2.0, 4.0, 5.0]


def test_cancel_stops_every_unfinished_node() -> None:
    store = MemoryStore()
    root = store.start(seq("s", api("a"), api("b")), 0)
    v = store.event(root, lambda plan: decide.cancel_run(plan, root))
    assert v.outcome == "accepted"
    assert {n.state for n in store.nodes.values()} == {"cancelled"}
    assert store.work == []
    late = succeed(store, by_name(store, "a"))
    assert late.outcome == "refused"


def test_cancel_and_redrive_are_recorded_before_the_state_changes_they_cause() -> None:
    store = MemoryStore()
    root = store.start(seq("s", api("a"), api("b")), 0)
    history: list[tuple[str, str | None, dict[str, Any]]] = []

    def recorded(plan: Plan, handler: Generator[decide.Request, Any, decide.Verdict],
                 ) -> Generator[decide.Request, Any, decide.Verdict]:
        verdict = yield from handler
        history.extend((e.kind, e.node_id, e.data) for e in plan.events)
        return verdict

    a, b = by_name(store, "a"), by_name(store, "b")
    store.event(root, lambda plan: recorded(plan, decide.cancel_run(plan, root)))
    cancelled = history[:]
    history.clear()
    store.event(root, lambda plan: recorded(plan, decide.redrive(plan, root)))

    assert cancelled[0] == ("cancel", root, {"from": "executing", "step": "s"})
    assert sorted((node, data["from"], data["to"]) for kind, node, data in cancelled[1:] if kind == "state") == sorted(
        [(root, "executing", "cancelled"), (a, "executing", "cancelled"), (b, "pending", "cancelled")])
    assert [kind for kind, _, _ in cancelled] == ["cancel", "state", "state", "state"]
    assert history[0] == ("run.retried", root, {"from": "cancelled", "step": "s"})
    assert [kind for kind, _, _ in history[1:]] == ["state"] * (len(history) - 1) and len(history) > 1
    # A refused cancel (the run is over) leaves no trace in the history.
    succeed(store, a)
    succeed(store, b)
    assert store.nodes[root].state == "complete"
    history.clear()
    assert store.event(root, lambda plan: recorded(plan, decide.cancel_run(plan, root))).outcome == "refused"
    assert history == []


def test_backoff_is_scaled_by_jitter_and_never_shorter_than_retry_after() -> None:
    store = MemoryStore()
    root = store.start(api("a", retry=RetryPolicy(max_attempts=5, backoff_s=4, max_backoff_s=60)), 0)

    def fail_with(plan: Plan, retry_after: float | None) -> Any:
        plan.jitter = 0.25
        return decide.attempt_failed(plan, root, store.nodes[root].attempt, "429", "http", True, retry_after)

    store.event(root, lambda plan: fail_with(plan, None))
    due = next(w.due_at for w in store.work if w.kind == "dispatch")
    assert (due - store.now).total_seconds() == 1.0  # 0.25 × 4 s
    store.event(root, lambda plan: fail_with(plan, 30.0))
    due = next(w.due_at for w in store.work if w.kind == "dispatch")
    assert (due - store.now).total_seconds() == 30.0


def test_heartbeats_restart_the_heartbeat_deadline_and_a_missed_one_times_out() -> None:
    store = MemoryStore()
    root = store.start(api("a", heartbeat_s=10, retry=RetryPolicy(max_attempts=1)), 0)
    first = next(w.due_at for w in store.work if w.kind == "heartbeat")
    assert store.event(root, lambda plan: decide.heartbeat(plan, root, 1)) == decide.ACCEPTED
    beats = [w for w in store.work if w.kind == "heartbeat"]
    assert len(beats) == 1 and beats[0].due_at > first
    assert {w.kind for w in store.work} == {"dispatch", "deadline", "heartbeat"}
    assert store.event(root, lambda plan: decide.heartbeat(plan, root, 2)).outcome == "refused"
    store.event(root, lambda plan: decide.deadline_passed(plan, root, 1, heartbeat=True))
    error = store.nodes[root].error
    assert error is not None and error["kind"] == "timeout" and "heartbeat_s=10" in error["message"]
    assert store.work == []


def fail_for_good(store: MemoryStore, name: str, message: str = "boom") -> None:
    node_id = by_name(store, name)
    attempt = store.nodes[node_id].attempt
    store.event(node_id, lambda plan: decide.attempt_failed(plan, node_id, attempt, message, "http", False))


def test_redrive_reruns_failed_and_cancelled_nodes_and_keeps_completed_ones() -> None:
    store = MemoryStore(SCRIPTS)
    tree = seq("s", api("a"), par("p", api("x"), api("y")), ("wrap", api("z")))
    root = store.start(tree, 1)
    succeed(store, by_name(store, "a"))
    succeed(store, by_name(store, "x"))
    fail_for_good(store, "y")
    assert store.nodes[root].state == "error"
    a_before = store.nodes[by_name(store, "a")]
    assert store.event(root, lambda plan: decide.redrive(plan, root)) == decide.ACCEPTED
    assert store.nodes[by_name(store, "a")] == a_before  # complete: kept, not called again
    y = store.nodes[by_name(store, "y")]
    assert y.state == "executing" and y.attempt == 2 and y.input == step_output("a", 1)
    assert dispatched(store) == [y.id]
    assert store.nodes[by_name(store, "z")].state == "pending"
    succeed(store, y.id)
    succeed(store, by_name(store, "z"))
    assert store.nodes[root].state == "complete"
    assert store.nodes[root].output == model(tree, 1)


def test_redrive_gives_a_fresh_retry_budget() -> None:
    store = MemoryStore()
    root = store.start(api("a", retry=RetryPolicy(max_attempts=2, backoff_s=0)), 0)
    for _ in range(2):
        att = store.nodes[root].attempt
        store.event(root, lambda plan, a=att: decide.attempt_failed(plan, root, a, "503", "http", True))
    assert store.nodes[root].state == "error" and store.nodes[root].attempt == 2
    store.event(root, lambda plan: decide.redrive(plan, root))
    store.event(root, lambda plan: decide.attempt_failed(plan, root, 3, "503", "http", True))
    assert store.nodes[root].state == "executing" and store.nodes[root].attempt == 4


def test_redrive_of_a_cancelled_run_starts_what_never_started_through_its_mapper() -> None:
    store = MemoryStore(SCRIPTS)
    tree = seq("s", api("a"), ("wrap", api("b")))
    root = store.start(tree, 5)
    store.event(root, lambda plan: decide.cancel_run(plan, root))
    store.event(root, lambda plan: decide.redrive(plan, root))
    succeed(store, by_name(store, "a"))
    assert store.nodes[by_name(store, "b")].input == {"wrapped": step_output("a", 5), "index": 1}
    succeed(store, by_name(store, "b"))
    assert store.nodes[root].output == model(tree, 5)


def test_only_a_failed_or_cancelled_run_can_be_redriven() -> None:
    store = MemoryStore()
    root = store.start(api("a"), 0)
    assert store.event(root, lambda plan: decide.redrive(plan, root)).outcome == "refused"


@settings(max_examples=200, deadline=None)
@given(tree=trees(), order=st.randoms(use_true_random=False), cancel=st.booleans(),
       counting=st.sampled_from(["in the event", "after the commit", "later"]), batch=st.sampled_from([1, 3, 1000]))
def test_a_redriven_run_ends_with_the_same_output_as_an_untroubled_one(tree: StepTree, order: Any,
                                                                      cancel: bool, counting: str, batch: int) -> None:
    store = MemoryStore(SCRIPTS, count_later=counting != "in the event", defer_counts=counting == "later",
                        batch=batch)
    store.scripts["count"] = lambda args: len(args[0])
    root = store.start(tree, 7)
    ready = dispatched(store)
    if not ready:
        return  # no api step: nothing can fail
    for node_id in order.sample(ready, k=order.randint(0, len(ready) - 1)):
        succeed(store, node_id)
    if cancel:
        store.event(root, lambda plan: decide.cancel_run(plan, root))
    elif still := dispatched(store):
        failing = store.nodes[order.choice(still)]
        store.event(failing.id, lambda plan: decide.attempt_failed(plan, failing.id, failing.attempt, "boom", "http",
                                                                    False))
    if store.nodes[root].state == "complete":
        return
    completed = {i for i, n in store.nodes.items() if n.state == "complete" and n.step.kind == "api"}
    assert store.event(root, lambda plan: decide.redrive(plan, root)) == decide.ACCEPTED
    while (ready := dispatched(store)) or store.complete_pending() or store.timers() or store.grows():
        if store.grows() and order.random() < 0.5:
            store.grow(order.choice(store.grows()))
        elif ready:
            node_id = order.choice(ready)
            assert node_id not in completed  # a completed step is never called again
            succeed(store, node_id)
        elif store.timers():
            store.fire(order.choice(store.timers()))
        if order.random() < 0.3:
            store.complete_pending()
    try:
        expected = model(tree, 7)
    except ValueError:
        return  # 'merge' over non-objects: the run fails in its reducer again, as it should
    assert store.nodes[root].state == "complete"
    assert store.nodes[root].output == expected
