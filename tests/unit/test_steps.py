"""Step trees: how many nodes one resolves to, counted without building it."""

from __future__ import annotations

from aetr.domain.kinds import ApiSpec, ParallelSpec
from aetr.domain.steps import StepConfig, StepTree, first_oversized


def test_a_tree_sharing_its_subtrees_is_counted_once_per_step_not_once_per_node() -> None:
    tree = StepTree(StepConfig(name="leaf", spec=ApiSpec(url="http://h/x")))
    for level in range(64):  # each level links the one below twice: 2**65 - 1 nodes in all
        tree = StepTree(StepConfig(name=f"l{level}", spec=ParallelSpec()), ((None, tree), (None, tree)))
    assert tree.node_count == 2**65 - 1


BOMB = {  # step -> (child, number of links); None for a child without children of its own
    "b1": [(None, 1000)],
    "b2": [("b1", 100)],
    "b3": [("b2", 100)],
    "pipe": [("b1", 1), (None, 2)],
}


def test_the_first_tree_too_big_is_one_with_nothing_too_big_below_it() -> None:
    assert first_oversized(BOMB, ["b3", "b2", "b1"], 10**9) is None
    assert first_oversized(BOMB, ["b3", "b2", "b1"], 10_010_100) == ("b3", 10_010_101)  # 1 + 100 × (1 + 100 × 1001)
    assert first_oversized(BOMB, ["b3", "b2", "b1"], 100_000) == ("b2", 100_101)
    assert first_oversized(BOMB, ["pipe", "b1"], 1003) == ("pipe", 1004)
    assert first_oversized(BOMB, ["pipe", "b1"], 1000) == ("b1", 1001)
    # Only the trees asked about are judged (those containing a changed step), each counted through all below it.
    assert first_oversized(BOMB, ["b1"], 1001) is None
    assert first_oversized(BOMB, ["b3"], 100_000) == ("b3", 10_010_101)
