"""Settings from the environment: the HTTP server's limits, how the connection cap fits the open-file limit, the
tree node limit, how a bad value is reported, and the README's table of them."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from aetr.api.server import FILES_RESERVED, PASSED_TO_WORKERS, fit_connections, serve
from aetr.config import ConfigError, Settings, env_name


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


def test_the_process_environment_and_a_given_mapping_are_read_alike(monkeypatch: pytest.MonkeyPatch) -> None:
    env = {"AETR_LEASE_S": "5", "AETR_ALLOWED_STEP_HOSTS": "catalog.internal, 10.0.0.0/8",
           "AETR_SQLITE_SYNCHRONOUS": "NORMAL", "AETR_MAX_IN_FLIGHT": "1e3", "AETR_PUBLIC_URL": "",
           "AETR_WORKERS": "4"}
    for name in Settings.model_fields:
        monkeypatch.delenv(env_name(name), raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    from_process = Settings.from_env()
    assert from_process == Settings.from_env(env)
    assert (from_process.lease_s, from_process.sqlite_synchronous, from_process.max_in_flight,
            from_process.public_url, from_process.workers) == (5.0, "normal", 1000, None, 4)
    assert from_process.allowed_step_hosts is not None
    assert from_process.allowed_step_hosts.names == frozenset({"catalog.internal"})
    monkeypatch.setenv("AETR_POLL_S", "-1")
    with pytest.raises(ConfigError, match=r"^AETR_POLL_S='-1' must be a finite number greater than 0$"):
        Settings.from_env()


def test_options_given_on_the_command_line_win_over_the_environment_and_none_means_not_given() -> None:
    settings = Settings.from_env({"AETR_PORT": "9000", "AETR_HOST": "0.0.0.0"}, port=8000, host=None)
    assert (settings.host, settings.port) == ("0.0.0.0", 8000)
    with pytest.raises(ConfigError, match="AETR_WORKERS=65 must be a whole number from 1 to 64"):
        Settings.from_env({}, workers=65)


def test_every_bad_value_is_named_in_one_message() -> None:
    with pytest.raises(ConfigError) as refused:
        Settings.from_env({"AETR_PORT": "http", "AETR_DB_POOL_SIZE": "0"})
    assert str(refused.value) == ("AETR_PORT='http' must be a whole number from 1 to 65535; "
                                  "AETR_DB_POOL_SIZE='0' must be a whole number of at least 1")


def test_the_worker_processes_are_handed_what_serve_was_told() -> None:
    told = Settings.from_env({}, host="0.0.0.0", port=8123, database_url="sqlite:///w.db", api_token="T")
    handed = told.environ(*PASSED_TO_WORKERS)
    assert handed == {"AETR_HOST": "0.0.0.0", "AETR_PORT": "8123", "AETR_DATABASE_URL": "sqlite:///w.db",
                      "AETR_API_TOKEN": "T"}
    assert Settings.from_env(handed) == told


def test_secrets_are_not_shown_in_the_settings_repr() -> None:
    shown = repr(Settings.from_env({"AETR_API_TOKEN": "tok-123", "AETR_SECRET": "sec-456"}))
    assert "tok-123" not in shown and "sec-456" not in shown


README = Path(__file__).resolve().parents[2] / "README.md"
ROW = re.compile(r"^\| `(AETR_[A-Z_]+)` \| ([^|]*) \|", re.M)


def test_the_readme_configuration_table_lists_every_setting_with_its_default() -> None:
    text = README.read_text(encoding="utf-8")
    table = text[text.index("## Configuration"):]
    rows = {name: default for name, default in ROW.findall(table)}
    assert set(rows) == {env_name(name) for name in Settings.model_fields}
    for name, field in Settings.model_fields.items():
        shown = rows[env_name(name)]
        if field.default is None:
            assert not re.match(r"\s*`\d", shown), (name, shown)  # "unset", "generated", ...: no value
        else:
            written = f"{field.default:g}" if isinstance(field.default, float) else str(field.default)
            assert shown.strip().startswith(f"`{written}`"), (name, shown, written)


def test_a_given_mapping_is_read_instead_of_the_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AETR_API_TOKEN", "from-the-shell")
    monkeypatch.setenv("AETR_POLL_S", "nonsense")
    assert Settings.from_env({}).api_token is None
    assert Settings.from_env({"AETR_API_TOKEN": "given"}).api_token == "given"
    with pytest.raises(ConfigError, match="AETR_POLL_S='nonsense' is not a number"):
        Settings.from_env()


def test_serve_stops_before_starting_anything_and_names_the_variable_it_cannot_use(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AETR_WORKERS", "0")
    with pytest.raises(SystemExit) as stopped:
        serve()
    assert stopped.value.code == "aetr: AETR_WORKERS='0' must be a whole number from 1 to 64"


def test_step_calls_are_made_in_the_serving_process_unless_told_otherwise() -> None:
    assert Settings.from_env({}).step_calls == "inline"
    assert Settings.from_env({"AETR_STEP_CALLS": "PROCESS"}).step_calls == "process"
    with pytest.raises(ConfigError, match=r"AETR_STEP_CALLS='thread': use one of inline, process"):
        Settings.from_env({"AETR_STEP_CALLS": "thread"})
