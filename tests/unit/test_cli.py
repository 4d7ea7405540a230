"""The `aetr` command line where no server is needed: files, arguments, and a server that is not there."""

from __future__ import annotations

import io
import os
import socket
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console
from rich.tree import Tree
from typer.testing import CliRunner, Result

from aetr.cli import render
from aetr.cli.main import StepFileError, app, load_step_definitions, parse_step_definitions
from aetr.cli.runs import parse_duration
from aetr.client import Client
from aetr.store.migrate import SchemaTooNew

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


# `aetr runs purge` durations


@pytest.mark.parametrize(("text", "seconds"), [("30d", 2_592_000), ("12h", 43_200), ("15m", 900), ("0s", 0),
                                               ("1.5d", 129_600), (" 2H ", 7_200)])
def test_a_purge_duration_is_a_number_and_a_unit(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["30", "d", "-1d", "1w", "1d2h", "", "1e3d", "36526d"])
def test_a_bad_purge_duration_is_a_usage_error_before_contacting_the_server(closed_url: str, text: str) -> None:
    result = invoke("--url", closed_url, "runs", "purge", "--older-than", text)
    assert_clean_exit(result, 2)
    assert "--older-than" in result.stderr and "cannot reach" not in result.stderr, result.stderr


# `aetr runs signal` arguments

RUN_ID = "6f1c7f55-0000-4000-8000-000000000000"
NODE_ID = "6f1c7f55-0000-4000-8000-000000000001"


def test_signal_without_an_answer_says_which_options_give_one(closed_url: str) -> None:
    result = invoke("--url", closed_url, "runs", "signal", RUN_ID, NODE_ID)
    assert_clean_exit(result, 2)
    assert result.stderr.startswith("error: give one of --output, --output-file or --error:")
    assert "cannot reach" not in result.stderr


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--output", "{}", "--error", "no"], "--output and --error"),
        (["--output", "{}", "--output-file", "x.json"], "--output and --output-file"),
        (["--output-file", "x.json", "--error", "no"], "--output-file and --error"),
    ],
)
def test_signal_with_two_answers_is_refused_before_contacting_the_server(
        closed_url: str, args: list[str], named: str) -> None:
    result = invoke("--url", closed_url, "runs", "signal", RUN_ID, NODE_ID, *args)
    assert_clean_exit(result, 2)
    assert result.stderr == f"error: give only one of --output, --output-file or --error, not {named}\n"


def test_signal_output_that_is_not_json_exits_2_with_an_example(closed_url: str) -> None:
    result = invoke("--url", closed_url, "runs", "signal", RUN_ID, NODE_ID, "--output", "{approved: true}")
    assert_clean_exit(result, 2)
    assert result.stderr.startswith("error: --output is not valid JSON (")
    assert """e.g. --output '{"approved": true}'""" in result.stderr
    assert "cannot reach" not in result.stderr


def test_signal_output_file_that_is_not_json_or_missing_names_the_file(tmp_path: Path, closed_url: str) -> None:
    bad = tmp_path / "answer.json"
    bad.write_text("yes")
    result = invoke("--url", closed_url, "runs", "signal", RUN_ID, NODE_ID, "--output-file", str(bad))
    assert_clean_exit(result, 2)
    assert f"error: --output-file {bad} is not valid JSON" in result.stderr
    missing = invoke("--url", closed_url, "runs", "signal", RUN_ID, NODE_ID, "--output-file", str(tmp_path / "no"))
    assert_clean_exit(missing, 2)
    assert f"cannot read --output-file {tmp_path / 'no'}: No such file or directory" in missing.stderr


def test_signal_output_null_and_stdin_are_answers(closed_url: str) -> None:
    # Parsing succeeded when the command gets as far as the server.
    for args, stdin in ((["--output", "null"], None), (["--output-file", "-"], '{"approved": false}')):
        result = invoke("--url", closed_url, "runs", "signal", RUN_ID, NODE_ID, *args, input=stdin)
        assert_clean_exit(result, 2)
        assert result.stderr == FRIENDLY.format(url=closed_url)


def test_signal_error_needs_a_message(closed_url: str) -> None:
    result = invoke("--url", closed_url, "runs", "signal", RUN_ID, NODE_ID, "--error", " ")
    assert_clean_exit(result, 2)
    assert "error: --error needs a message" in result.stderr


@pytest.mark.parametrize("answer", [{}, {"output": 1, "error": "no"}, {"error": ""}])
async def test_the_client_signal_takes_exactly_one_answer(answer: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=r"exactly one of `output`|non-empty message"):
        await Client().signal(RUN_ID, NODE_ID, **answer)


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
        ["runs", "signal", "6f1c7f55-0000-4000-8000-000000000000", "6f1c7f55-0000-4000-8000-000000000001",
         "--output", '{"approved": true}'],
        ["runs", "signal", "6f1c7f55-0000-4000-8000-000000000000", "6f1c7f55-0000-4000-8000-000000000001",
         "--error", "rejected"],
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


def test_serve_hands_its_options_to_the_server_without_touching_the_environment(
        monkeypatch: pytest.MonkeyPatch) -> None:
    calls = fake_module(monkeypatch, "aetr.api.server", "serve")
    result = invoke("--token", "T", "serve", "--host", "0.0.0.0", "--port", "9000", "--insecure",
                    "--database-url", "postgresql://db/aetr", "--workers", "3")
    assert_clean_exit(result, 0)
    assert calls == [{"args": (), "kwargs": {"host": "0.0.0.0", "port": 9000, "insecure": True, "workers": 3,
                                             "database_url": "postgresql://db/aetr", "api_token": "T"},
                      "env": None}]


def test_serve_leaves_what_it_was_not_told_to_the_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = fake_module(monkeypatch, "aetr.api.server", "serve")
    assert_clean_exit(invoke("serve"), 0)
    assert calls[0]["kwargs"] == {"host": None, "port": None, "insecure": False, "workers": None,
                                  "database_url": None, "api_token": None}


def test_serve_refuses_a_worker_count_out_of_range() -> None:
    result = invoke("serve", "--workers", "0")
    assert result.exit_code == 2 and "--workers" in result.output


def test_migrate_uses_the_option_then_aetr_database_url_then_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = fake_module(monkeypatch, "aetr.store.migrate", "upgrade")
    monkeypatch.setattr(sys.modules["aetr.store.migrate"], "SchemaTooNew", SchemaTooNew, raising=False)
    assert_clean_exit(invoke("migrate", "--database-url", "sqlite:///x.db"), 0)
    assert_clean_exit(invoke("migrate"), 0)
    assert_clean_exit(runner.invoke(app, ["migrate"], env={"AETR_DATABASE_URL": "sqlite:///from-env.db"}), 0)
    assert [c["args"] for c in calls] == [("sqlite:///x.db",), ("sqlite:///./aetr.db",), ("sqlite:///from-env.db",)]


# Rendering the new kinds: step trees and run trees


def text_of(tree: Tree) -> str:
    """What a terminal shows of a tree, without colours, on a line wide enough for any label."""
    console = Console(file=io.StringIO(), width=300, color_system=None, record=True)
    console.print(tree)
    return console.export_text()


def run_node(name: str, kind: str, state: str, position: int = 0, **fields: Any) -> dict[str, Any]:
    return {"id": f"node-{name}-{position}", "root_id": "run-1", "position": position,
            "step": {"name": name, "kind": kind}, "state": state, "attempt": 1, "error": None,
            "wait_until": None, "awaits_signal": False, "children": [], **fields}


def test_a_map_step_shows_items_limits_reducer_and_its_one_child_with_its_mapper() -> None:
    step = {"name": "prices", "kind": "map", "version": 2, "items": "(input) => input.skus", "max_concurrency": 10,
            "tolerated_failures": "10%", "reducer": "merge",
            "child": {"mapper": "(item, ctx) => ({sku: item})",
                      "step": {"name": "price", "kind": "api", "version": 1, "url": "http://x/price"}}}
    lines = text_of(render.step_tree(step)).splitlines()
    assert lines[0] == ("prices  map  v2  items (input) => input.skus  max_concurrency 10  tolerated_failures 10%  "
                        "reducer merge")
    assert lines[1] == "└── price  api  v1  POST http://x/price (callback)  mapper (item, ctx) => ({sku: item})"
    assert len(lines) == 2


def test_a_map_without_items_maps_its_input() -> None:
    step = {"name": "m", "kind": "map", "items": None, "max_concurrency": None, "tolerated_failures": 0,
            "reducer": "array", "child": {"mapper": None, "step": {"name": "c", "kind": "sequential"}}}
    first = text_of(render.step_tree(step)).splitlines()[0]
    assert first == "m  map  items = input  tolerated_failures 0  reducer array"


def test_a_choice_shows_each_childs_condition_and_the_default() -> None:
    step = {"name": "route", "kind": "choice", "children": [
        {"mapper": None, "when": "(input) => input.total > 100", "step": {"name": "big", "kind": "sequential"}},
        {"mapper": "(input) => input.id", "when": None, "step": "small"}]}
    lines = text_of(render.step_tree(step)).splitlines()
    assert lines[1] == "├── big  sequential  when (input) => input.total > 100"
    assert lines[2] == "└── small  ?  mapper (input) => input.id  otherwise"


@pytest.mark.parametrize(
    ("fields", "shown"),
    [
        ({"seconds": 30}, "pause  wait  v1  30s"),
        ({"seconds": 0.5}, "pause  wait  v1  0.5s"),
        ({"until": "(input) => input.at"}, "pause  wait  v1  until (input) => input.at"),
        ({"signal": True, "timeout_s": 86400}, "pause  wait  v1  signal, timeout 86400s"),
    ],
)
def test_a_wait_shows_how_long_it_waits(fields: dict[str, Any], shown: str) -> None:
    tree = render.step_tree({"name": "pause", "kind": "wait", "version": 1, **fields})
    assert text_of(tree).strip() == shown


def test_an_api_step_shows_max_concurrency_only_when_set() -> None:
    step = {"name": "a", "kind": "api", "url": "http://x/a", "mode": "sync"}
    assert text_of(render.step_tree(step)).strip() == "a  api  POST http://x/a (sync)"
    limited = text_of(render.step_tree({**step, "max_concurrency": 4})).strip()
    assert limited == "a  api  POST http://x/a (sync)  max_concurrency 4"


def test_a_skipped_node_is_dimmed_whole_and_its_state_named() -> None:
    run = run_node("route", "choice", "complete", children=[
        run_node("big", "sequential", "complete", 0), run_node("small", "sequential", "skipped", 1)])
    tree = render.run_tree(run)
    chosen, skipped = (str(child.label) for child in tree.children)
    assert not chosen.startswith("[dim]")
    assert skipped.startswith("[dim]") and skipped.endswith("[/dim]")
    assert render.state("skipped") in skipped
    assert "small  sequential  skipped" in text_of(tree)


def test_a_wait_shows_when_it_ends_or_that_it_awaits_a_signal_with_the_node_id() -> None:
    run = run_node("flow", "sequential", "executing", children=[
        run_node("pause", "wait", "executing", 0, wait_until="2026-12-04T10:00:00+00:00"),
        run_node("approve", "wait", "executing", 1, awaits_signal=True),
        run_node("done", "wait", "complete", 2, wait_until="2026-12-01T10:00:00+00:00")])
    lines = text_of(render.run_tree(run)).splitlines()
    assert lines[1].endswith("waits until 2026-12-04 10:00:00 UTC"), lines
    assert lines[2].endswith("awaiting signal node node-approve-1"), lines
    assert "until" not in lines[3], lines  # a finished wait waits for nothing


def test_a_small_map_counts_its_items_by_state_and_shows_them_all() -> None:
    states = ["complete", "error", "complete", "pending", "executing", "complete"]
    items = [run_node("price", "api", s, i) for i, s in enumerate(states)]
    lines = text_of(render.run_tree(run_node("prices", "map", "executing", children=items))).splitlines()
    assert lines[0].endswith("3 complete · 1 error · 1 executing · 1 pending"), lines
    assert len(lines) == 1 + len(states)
    assert lines[2].startswith("├── item 1  price  api  error")


def test_a_big_map_shows_its_first_failed_items_and_one_line_for_the_rest() -> None:
    items = [run_node("price", "api", "complete", i) for i in range(3)]
    items += [run_node("price", "api", "error", i + 3, error={"message": f"HTTP 500 for item {i + 3}"})
              for i in range(7)]
    items += [run_node("price", "api", "pending", i) for i in range(10, 10_000)]
    lines = text_of(render.run_tree(run_node("prices", "map", "executing", children=items))).splitlines()
    assert lines[0].endswith("3 complete · 7 error · 9990 pending"), lines[0]
    assert len(lines) == 1 + render.MAP_FAILURES_SHOWN + 1
    assert lines[1].startswith("├── item 3  price  api  error") and lines[1].endswith("— HTTP 500 for item 3")
    assert lines[5].startswith("├── item 7  price  api  error")
    assert lines[6] == ("└── … 9995 of 10000 items not shown, only the first 5 failed; "
                        "all: aetr runs show run-1 --json")


def test_a_big_map_without_failures_shows_only_its_counts_and_the_summary() -> None:
    items = [run_node("price", "api", "complete", i) for i in range(21)]
    lines = text_of(render.run_tree(run_node("prices", "map", "complete", children=items))).splitlines()
    assert lines[0].endswith("21 complete")
    assert lines[1:] == ["└── … 21 of 21 items not shown; all: aetr runs show run-1 --json"]


def test_a_map_without_items_says_so() -> None:
    assert "no items" in text_of(render.run_tree(run_node("prices", "map", "complete")))


# Tables: 80 columns on a terminal, tab-separated in a pipe

RUNS = [{"id": f"01a23caf-e{i}d5-789a-be48-e21a20e7f25{i}", "step": {"name": "catalog-pipeline-with-a-long-name"},
         "state": state, "created_at": f"2026-12-03T16:14:5{i}+00:00", "started_at": f"2026-12-03T16:14:5{i}+00:00",
         "completed_at": "2026-12-03T16:14:59+00:00"} for i, state in enumerate(["complete", "executing", "error"])]


def drawn_lines(table: render.Rows, width: int = 80) -> list[str]:
    console = Console(file=io.StringIO(), width=width, color_system=None, record=True, force_terminal=True)
    console.print(render.drawn(table, width))
    return console.export_text().splitlines()


def test_the_runs_table_fits_80_columns_one_line_a_run_with_ids_states_and_times_whole() -> None:
    lines = drawn_lines(render.runs_table(RUNS))
    assert len(lines) == 1 + len(RUNS), lines
    assert all(len(line) <= 80 for line in lines), lines
    for line, run in zip(lines[1:], RUNS, strict=True):
        short = run["id"][:11]  # they differ at the 11th character
        assert line.startswith(f"{short}  "), line
        assert run["state"] in line and run["created_at"][11:19] in line, line
    # The step's name gives way, and only it: 80 columns hold all but its last characters.
    assert "catalog-pipeline-with-a-long…" in lines[1], lines
    wide = drawn_lines(render.runs_table(RUNS), 120)
    assert "catalog-pipeline-with-a-long-name" in wide[1] and "…" not in wide[1], wide
    narrow = drawn_lines(render.runs_table(RUNS), 60)
    assert all(len(line) <= 60 for line in narrow) and len(narrow) == 4, narrow
    assert "executing" in narrow[2] and "2026-12-03 16:14:51" in narrow[2], narrow


def test_a_table_in_a_pipe_is_tab_separated_whole_with_a_header() -> None:
    text = render.tab_separated(render.runs_table(RUNS))
    lines = text.splitlines()
    assert lines[0] == "run\tstep\tstate\tcreated (UTC)\ttook"
    assert lines[1].split("\t")[:3] == [RUNS[0]["id"], "catalog-pipeline-with-a-long-name", "complete"]
    assert all(len(line.split("\t")) == 5 for line in lines)


def history(*events: tuple[str, str | None, dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"at": f"2026-12-03T16:14:5{i}.123+00:00", "kind": kind, "node_id": node, "data": data}
            for i, (kind, node, data) in enumerate(events)]


NODE = "01a23caf-e0d5-789a-be48-e21a20e7f25d"


def test_each_history_line_names_its_step_and_says_what_a_report_was() -> None:
    events = history(
        ("state", NODE, {"from": "pending", "to": "executing", "step": "ingest"}),
        ("dispatch", NODE, {"attempt": 1, "report": "failure", "outcome": "accepted", "step": "ingest",
                            "error": "POST http://x/ingest failed: Cannot connect to host x:80"}),
        ("retry", NODE, {"attempt": 1, "next_attempt": 2, "delay_s": 1.5, "error": "POST http://x failed",
                         "step": "ingest"}),
        ("dispatch", NODE, {"attempt": 2, "status": 202, "ms": 3.3}),  # recorded before lines named their step
        ("callback", NODE, {"attempt": 2, "report": "output", "outcome": "accepted", "step": "ingest"}),
        ("callback", NODE, {"attempt": 1, "outcome": "refused", "reason": "attempt 1 was superseded by attempt 2"}))
    table = render.events_table(events, {NODE: "ingest"})
    rows = [[cell.text for cell in row] for row in table.rows]
    assert [row[2] for row in rows] == ["ingest"] * 6
    assert [row[1] for row in rows] == ["20e7f25d"] * 6
    assert rows[0][3] == "→ executing"
    assert rows[1][3] == "call failed" and "Cannot connect" in rows[1][4], rows[1]
    assert not any("accepted" in cell or "taken" in cell for cell in rows[1]), rows[1]
    assert rows[2][3] == "will retry" and "attempt 2 in 1.50 s" in rows[2][4]
    assert rows[3][3:] == ["called", "HTTP 202 in 3.3 ms, attempt 2"]
    assert rows[4][3:] == ["callback", "output taken, attempt 2"]
    assert rows[5][3] == "callback ignored" and "superseded" in rows[5][4]
    lines = drawn_lines(table)
    assert all(len(line) <= 80 for line in lines) and len(lines) == 7, lines
    assert lines[1].startswith("16:14:50.123  20e7f25d  ingest"), lines[1]


# --help


def all_commands(group: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    for name, command in group.commands.items():
        yield (*path, name), command
        if hasattr(command, "commands"):
            yield from all_commands(command, (*path, name))


def test_help_names_no_python_types_and_every_command_has_a_one_line_summary() -> None:
    from typer.main import get_command

    root = get_command(app)
    commands = list(all_commands(root))
    assert {" ".join(p) for p, _ in commands} >= {"apply", "run", "runs show", "runs signal", "steps list"}
    for path, command in [((), root), *commands]:
        result = runner.invoke(app, [*path, "--help"], env={"COLUMNS": "80"})
        assert result.exit_code == 0, (path, result.output)
        for python_type in ("<bool>", "<str>", "<float", "<int"):
            assert python_type not in result.output, (path, result.output)
        assert all(len(line) <= 80 for line in result.output.splitlines()), path
        summary = (command.help or "").strip().splitlines()
        assert summary and summary[0].endswith((".", ")")), (path, command.help)
    signal = runner.invoke(app, ["runs", "signal", "--help"], env={"COLUMNS": "80"}).output
    assert "{RUN} {NODE}" in signal and "--output" in signal and "JSON" in signal
    assert "Short ids" in runner.invoke(app, ["runs", "--help"], env={"COLUMNS": "80"}).output


def test_apply_takes_the_file_as_an_argument_or_with_f_but_not_both(tmp_path: Path, closed_url: str) -> None:
    good = tmp_path / "a.yaml"
    good.write_text("name: a\nkind: api\nurl: http://x/a\n")
    for args in (["apply", str(good)], ["apply", "-f", str(good)], ["apply", "--diff", str(good)]):
        result = invoke("--url", closed_url, *args)
        assert_clean_exit(result, 2)
        assert result.stderr == FRIENDLY.format(url=closed_url), args  # read, and on its way to the server
    both = invoke("--url", closed_url, "apply", str(good), "-f", str(good))
    assert_clean_exit(both, 2)
    assert "give the file of step definitions once: aetr apply FILE" in both.stderr
    assert "give the file" in invoke("apply").stderr


def test_a_run_id_that_is_not_hex_is_refused_before_contacting_the_server(closed_url: str) -> None:
    for args in (["runs", "show", "run-1"], ["runs", "events", "01a"], ["runs", "cancel", "01a2x"]):
        result = invoke("--url", closed_url, *args)
        assert_clean_exit(result, 2)
        assert "is not a run id or the start of one: give at least 4 of its hex digits" in result.stderr, result
