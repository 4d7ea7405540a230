"""The `aetr` command line where no server is needed: files, arguments, and a server that is not there."""

from __future__ import annotations

import os
import socket
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner, Result

from aetr.cli.main import StepFileError, app, load_step_definitions, parse_step_definitions

# No AETR_* from the developer's shell may leak into what these tests see.
runner = CliRunner(env={"AETR_URL": None, "AETR_API_TOKEN": None, "AETR_DATABASE_URL": None})


@pytest.fixture
def closed_url() -> Iterator[str]:
    """The URL of a loopback port that refuses connections: bound, never listening, so nobody else gets it."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"


def invoke(*args: str, input: str | None = None) -> Result:
    return runner.invoke(app, list(args), input=input)


def assert_clean_exit(result: Result, code: int) -> None:
    """The command ended with `code` through a normal exit, never an uncaught exception."""
    assert result.exit_code == code, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output


# Step definition files


def test_a_yaml_file_may_hold_one_step() -> None:
    assert parse_step_definitions("name: a\nkind: api\nurl: http://x/a\n", "a.yaml") == [
        {"name": "a", "kind": "api", "url": "http://x/a"}]


def test_a_yaml_file_may_hold_a_list_of_steps_kept_in_order() -> None:
    text = "- {name: b, kind: api, url: 'http://x/b'}\n- {name: a, kind: sequential, children: [{step: b}]}\n"
    assert [s["name"] for s in parse_step_definitions(text, "steps.yml")] == ["b", "a"]


def test_a_multi_document_stream_is_flattened_in_order_and_empty_documents_skipped() -> None:
    text = "---\nname: c\nkind: api\nurl: http://x/c\n---\n- name: b\n  kind: api\n  url: http://x/b\n" \
           "---\nname: a\nkind: parallel\nchildren: [{step: c}, {step: b}]\n---\n"
    assert [s["name"] for s in parse_step_definitions(text, "all.yaml")] == ["c", "b", "a"]


def test_mappers_in_yaml_block_scalars_keep_their_text() -> None:
    text = ("name: p\nkind: sequential\nchildren:\n  - step: a\n    mapper: |\n"
            "      (input) => ({\n        x: input.y,\n      })\n")
    (step,) = parse_step_definitions(text, "p.yaml")
    assert step["children"][0]["mapper"] == "(input) => ({\n  x: input.y,\n})\n"


def test_a_json_file_may_hold_one_step_or_a_list(tmp_path: Path) -> None:
    one = tmp_path / "one.json"
    one.write_text('{"name": "a", "kind": "api", "url": "http://x/a"}')
    many = tmp_path / "many.json"
    many.write_text('[{"name": "b", "kind": "api", "url": "http://x/b"}, {"name": "c", "kind": "sequential"}]')
    assert [s["name"] for s in load_step_definitions(str(one))] == ["a"]
    assert [s["name"] for s in load_step_definitions(str(many))] == ["b", "c"]


@pytest.mark.parametrize(
    ("text", "source", "message"),
    [
        ("name: a\n  kind: api\n", "bad.yaml", r"bad.yaml: not valid YAML: .* at line 2, column 7"),
        ('{"name": "a",}', "bad.json", r"bad.json: not valid JSON: "),
        ("just a string\n", "s.yaml", r"s.yaml: expected a step definition \(a mapping with name and kind\), got str"),
        ("- name: a\n- kind: api\n", "l.yaml", r'l.yaml, item 2: a step definition needs a "name"'),
        ("name: a\n---\nname: 5\n", "m.yaml", r'm.yaml, document 2: a step definition needs a "name"'),
        ("---\n", "empty.yaml", r"empty.yaml: no step definitions found"),
        ("name: a\n---\nname: '..'\nkind: sequential\n", "d.yaml",
         r"d.yaml, document 2: the name '\.\.' must be 1–200 letters, digits, '-', '_' or '\.', and not dots alone"),
        ('[{"name": "."}]', "d.json", r"d.json, item 1: the name '\.' must be .* not dots alone"),
        ("name: a b\n", "s.yaml", r"s.yaml: the name 'a b' must be 1–200 letters"),
        (f"name: {'a' * 201}\n", "l.yaml", r"l.yaml: the name 'a{60}' must be 1–200 letters"),
    ],
)
def test_a_bad_file_is_refused_with_where_and_what(text: str, source: str, message: str) -> None:
    with pytest.raises(StepFileError, match=message):
        parse_step_definitions(text, source)


def test_apply_reports_a_bad_file_with_exit_2_before_contacting_the_server(
        tmp_path: Path, closed_url: str) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("- name: a\n- 3\n")
    result = invoke("--url", closed_url, "apply", "-f", str(bad))
    assert_clean_exit(result, 2)
    assert f"error: {bad}, item 2: expected a step definition" in result.stderr
    assert "cannot reach" not in result.stderr


def test_apply_of_a_missing_file_says_so(tmp_path: Path) -> None:
    result = invoke("apply", "-f", str(tmp_path / "nope.yaml"))
    assert_clean_exit(result, 2)
    assert f"cannot read {tmp_path / 'nope.yaml'}: No such file or directory" in result.stderr


def test_apply_reads_standard_input_with_a_dash(closed_url: str) -> None:
    # Parsing succeeded when the command gets as far as the server.
    result = invoke("--url", closed_url, "apply", "-f", "-", input="name: a\nkind: api\nurl: http://x/a\n")
    assert_clean_exit(result, 2)
    assert "cannot reach AETR" in result.stderr
    bad = invoke("--url", closed_url, "apply", "-f", "-", input="[1]\n")
    assert_clean_exit(bad, 2)
    assert "<stdin>, item 1: expected a step definition" in bad.stderr


# `aetr run` arguments


def test_run_input_that_is_not_json_exits_2_with_an_example() -> None:
    result = invoke("run", "ingest", "--input", "{source: acme}")
    assert_clean_exit(result, 2)
    assert result.stderr.startswith("error: --input is not valid JSON (")
    assert """e.g. --input '{"source": "acme"}'""" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_run_input_file_that_is_not_json_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "in.json"
    bad.write_text("not json")
    result = invoke("run", "ingest", "--input-file", str(bad))
    assert_clean_exit(result, 2)
    assert f"error: --input-file {bad} is not valid JSON" in result.stderr


def test_run_input_and_input_file_together_are_refused(tmp_path: Path) -> None:
    result = invoke("run", "ingest", "--input", "{}", "--input-file", str(tmp_path / "x.json"))
    assert_clean_exit(result, 2)
    assert "give --input or --input-file, not both" in result.stderr


def test_run_input_file_that_is_missing_says_so(tmp_path: Path) -> None:
    result = invoke("run", "ingest", "--input-file", str(tmp_path / "x.json"))
    assert_clean_exit(result, 2)
    assert "cannot read --input-file" in result.stderr and "No such file or directory" in result.stderr


def test_run_timeout_must_not_be_negative() -> None:
    result = invoke("run", "ingest", "--timeout", "-1")
    assert_clean_exit(result, 2)
    assert "--timeout" in result.output


# A server that is not there


FRIENDLY = "error: cannot reach AETR at {url} — is `aetr serve` running?\n"


@pytest.mark.parametrize(
    "args",
    [
        ["steps", "list"],
        ["steps", "show", "ingest"],
        ["steps", "delete", "ingest"],
        ["runs", "list", "--state", "error"],
        ["runs", "show", "6f1c7f55-0000-4000-8000-000000000000"],
        ["runs", "events", "6f1c7f55-0000-4000-8000-000000000000"],
        ["runs", "cancel", "6f1c7f55-0000-4000-8000-000000000000"],
        ["runs", "retry", "6f1c7f55-0000-4000-8000-000000000000"],
        ["run", "ingest", "--input", '{"source": "acme"}'],
        ["run", "ingest", "--wait", "--timeout", "5"],
    ],
)
def test_an_unreachable_server_gives_one_friendly_line_and_exit_2(closed_url: str, args: list[str]) -> None:
    result = invoke("--url", closed_url, *args)
    assert_clean_exit(result, 2)
    assert result.stderr == FRIENDLY.format(url=closed_url)
    assert result.stdout == ""


def test_the_url_comes_from_aetr_url_when_not_given(closed_url: str) -> None:
    result = runner.invoke(app, ["steps", "list"], env={"AETR_URL": closed_url})
    assert_clean_exit(result, 2)
    assert result.stderr == FRIENDLY.format(url=closed_url)


def test_a_url_that_is_not_http_is_named(closed_url: str) -> None:
    result = invoke("--url", "localhost:9999", "steps", "list")
    assert_clean_exit(result, 2)
    assert "'localhost:9999' is not an AETR URL: give one like http://127.0.0.1:9999" in result.stderr


# serve and migrate hand over to the server and store modules


def fake_module(monkeypatch: pytest.MonkeyPatch, name: str, function: str) -> list[dict[str, Any]]:
    """Put a module with one recording function in place of `name`; return its calls."""
    calls: list[dict[str, Any]] = []
    module = types.ModuleType(name)

    def record(*args: Any, **kwargs: Any) -> None:
        calls.append({"args": args, "kwargs": kwargs, "env": os.environ.get("AETR_DATABASE_URL")})

    setattr(module, function, record)
    monkeypatch.setitem(sys.modules, name, module)
    return calls


def test_serve_passes_host_port_insecure_and_sets_the_database_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AETR_DATABASE_URL", "sqlite:///before.db")  # restored after the test
    calls = fake_module(monkeypatch, "aetr.api.server", "serve")
    result = invoke("serve", "--host", "0.0.0.0", "--port", "9000", "--insecure",
                    "--database-url", "postgresql://db/aetr", "--workers", "3")
    assert_clean_exit(result, 0)
    assert calls == [{"args": (), "kwargs": {"host": "0.0.0.0", "port": 9000, "insecure": True, "workers": 3},
                      "env": "postgresql://db/aetr"}]


def test_serve_defaults_to_loopback_9999(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = fake_module(monkeypatch, "aetr.api.server", "serve")
    assert_clean_exit(invoke("serve"), 0)
    assert calls[0]["kwargs"] == {"host": "127.0.0.1", "port": 9999, "insecure": False, "workers": None}


def test_serve_refuses_a_worker_count_out_of_range() -> None:
    result = invoke("serve", "--workers", "0")
    assert result.exit_code == 2 and "--workers" in result.output


def test_migrate_passes_the_option_or_none(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = fake_module(monkeypatch, "aetr.store.migrate", "upgrade")
    assert_clean_exit(invoke("migrate", "--database-url", "sqlite:///x.db"), 0)
    assert_clean_exit(invoke("migrate"), 0)
    assert [c["args"] for c in calls] == [("sqlite:///x.db",), (None,)]
