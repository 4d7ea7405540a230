"""Settings read from the environment."""

from __future__ import annotations

import pytest

from aetr.config import ConfigError, Settings


def test_the_tree_node_limit_defaults_to_200_000_and_is_read_from_aetr_max_tree_nodes() -> None:
    assert Settings().max_tree_nodes == Settings.from_env({}).max_tree_nodes == 200_000
    assert Settings.from_env({"AETR_MAX_TREE_NODES": "1000"}).max_tree_nodes == 1000
    with pytest.raises(ConfigError, match="AETR_MAX_TREE_NODES"):
        Settings.from_env({"AETR_MAX_TREE_NODES": "0"})
