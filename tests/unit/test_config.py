"""Settings from the environment: the HTTP server's limits, how the connection cap fits the open-file limit, and
the tree node limit."""

from __future__ import annotations

import pytest

from aetr.api.server import FILES_RESERVED, fit_connections
from aetr.config import ConfigError, Settings


def test_idle_connections_are_kept_longer_than_common_clients_keep_theirs() -> None:
    # aiohttp keeps an idle connection 15 s, load balancers commonly 60 s: the server must outlast both.
    assert Settings().keep_alive_s > 60
    assert Settings.from_env({}).keep_alive_s == Settings().keep_alive_s


def test_the_http_limits_are_read_from_the_environment() -> None:
    settings = Settings.from_env({"AETR_KEEP_ALIVE_S": "120", "AETR_HEADER_TIMEOUT_S": "2.5",
                                  "AETR_BODY_TIMEOUT_S": "30", "AETR_MAX_CONNECTIONS": "50"})
    assert (settings.keep_alive_s, settings.header_timeout_s, settings.body_timeout_s,
            settings.max_connections) == (120.0, 2.5, 30.0, 50)


@pytest.mark.parametrize(("key", "raw"), [
    ("AETR_KEEP_ALIVE_S", "0"), ("AETR_KEEP_ALIVE_S", "nan"), ("AETR_HEADER_TIMEOUT_S", "-1"),
    ("AETR_BODY_TIMEOUT_S", "soon"), ("AETR_BODY_TIMEOUT_S", "inf"),
    ("AETR_MAX_CONNECTIONS", "0"), ("AETR_MAX_CONNECTIONS", "0.5"), ("AETR_MAX_CONNECTIONS", "many")])
def test_a_bad_http_limit_is_refused_with_its_name(key: str, raw: str) -> None:
    with pytest.raises(ConfigError, match=key):
        Settings.from_env({key: raw})


def test_the_connection_cap_is_lowered_to_fit_the_open_file_limit() -> None:
    settings = Settings(max_connections=1000, db_pool_size=20, max_in_flight=256)
    assert fit_connections(settings, 1024).max_connections == 1024 - 20 - 256 - FILES_RESERVED
    assert fit_connections(settings, 100_000) == settings
    assert fit_connections(settings, None) == settings  # no limit known (not a POSIX system)


def test_too_few_open_files_for_the_pools_and_any_connection_is_refused() -> None:
    with pytest.raises(ConfigError, match="ulimit -n"):
        fit_connections(Settings(db_pool_size=20, max_in_flight=256), 300)


def test_the_tree_node_limit_defaults_to_200_000_and_is_read_from_aetr_max_tree_nodes() -> None:
    assert Settings().max_tree_nodes == Settings.from_env({}).max_tree_nodes == 200_000
    assert Settings.from_env({"AETR_MAX_TREE_NODES": "1000"}).max_tree_nodes == 1000
    for bad in ("0", "0.5", "many"):
        with pytest.raises(ConfigError, match="AETR_MAX_TREE_NODES"):
            Settings.from_env({"AETR_MAX_TREE_NODES": bad})
