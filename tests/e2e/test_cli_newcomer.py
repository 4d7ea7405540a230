"""The command line as a newcomer meets it, against the real server: short ids, tables in a terminal and in a
pipe, the history of a run, and applying a file again."""

from __future__ import annotations

import asyncio
import os
import pty
import re
import subprocess
from pathlib import Path

import aiohttp

from aetr.domain.ids import node_tails, run_prefixes
from aetr.testing import StepService
from tests.e2e.harness import CLI_TIMEOUT_S, AetrServer, Api, aetr_command, clean_env, cli, nodes_by_name
from tests.e2e.test_cli_runs import awaiting_signal, put_approval


def _read_all(fd: int) -> bytes:
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # EIO: the other end is closed
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


async def on_terminal(*args: str) -> tuple[int, str]:
    """Run `aetr ARGS` with its output on a terminal 80 columns wide, as a person sees it: (exit code, text)."""
    main, other = pty.openpty()
    env = clean_env({"COLUMNS": "80", "LINES": "50", "TERM": "dumb", "NO_COLOR": "1"})
    proc = await asyncio.create_subprocess_exec(*aetr_command(), *args, env=env, stdin=subprocess.DEVNULL,
                                                stdout=other, stderr=other)
    os.close(other)
    try:
        async with asyncio.timeout(CLI_TIMEOUT_S):
            text = await asyncio.to_thread(_read_all, main)
            code = await proc.wait()
    finally:
        os.close(main)
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    return code, text.decode().replace("\r\n", "\n")


async def test_runs_are_taken_by_any_start_of_their_id_and_an_ambiguous_start_lists_them(
        aetr: AetrServer, http: aiohttp.ClientSession) -> None:
    api = Api(http, aetr.url)
    await api.put_step({"name": "empty", "kind": "sequential"})
    ids = [await api.start_run("empty", {"n": n}) for n in range(3)]
    url = ("--url", aetr.url)

    piped = await cli(*url, "runs", "list")
    assert piped.code == 0, piped
    lines = piped.stdout.splitlines()
    assert lines[0] == "run\tstep\tstate\tcreated (UTC)\ttook", piped
    assert [line.split("\t")[0] for line in lines[1:]] == list(reversed(ids)), piped  # whole ids, for scripts

    code, shown = await on_terminal(*url, "runs", "list")
    assert code == 0, shown
    short = run_prefixes(ids)
    assert all(len(line) <= 80 for line in shown.splitlines()), shown
    assert [line.split()[0] for line in shown.splitlines()[1:]] == [short[i] for i in reversed(ids)], shown

    for run_id in ids:
        found = await cli(*url, "runs", "show", short[run_id], "--json")
        assert found.code == 0 and f'"id": "{run_id}"' in found.stdout, found
    shared = min(short.values(), key=len)[:6]
    ambiguous = await cli(*url, "runs", "show", shared)
    assert ambiguous.code == 2 and ambiguous.stdout == "", ambiguous
    assert ambiguous.stderr.startswith(f"error: {shared} is the start of 3 runs' ids; give more of the one"), ambiguous
    assert all(run_id in ambiguous.stderr for run_id in ids), ambiguous
    unknown = await cli(*url, "runs", "events", "0000")
    assert unknown.code == 2 and "no run's id starts with 0000" in unknown.stderr, unknown


async def test_runs_events_names_the_step_on_every_line_and_a_node_is_taken_by_the_end_of_its_id(
        aetr: AetrServer, http: aiohttp.ClientSession) -> None:
    async with StepService() as svc:
        api = Api(http, aetr.url)
        await put_approval(api, svc)
        run_id = await api.start_run("approval", {"order": 7})
        wait = await awaiting_signal(api, run_id, "approve")
        url = ("--url", aetr.url)
        tail = node_tails([n["id"] for n in nodes_by_name(await api.run(run_id)).values()])[wait["id"]]

        signalled = await cli(*url, "runs", "signal", run_id[:13], tail, "--output", '{"approved": true}')
        assert signalled.code == 0, signalled
        assert (await api.wait_run(run_id))["state"] == "complete"

        events = await cli(*url, "runs", "events", run_id)
        assert events.code == 0, events
        rows = [line.split("\t") for line in events.stdout.splitlines()]
        assert rows[0] == ["time (UTC)", "node", "step", "event", "detail"], events
        assert {row[2] for row in rows[1:]} == {"approval", "approve", "record"}, events
        what = [(row[2], row[3]) for row in rows[1:]]
        assert what.index(("approve", "signal")) < what.index(("approve", "→ complete")), events
        assert what[-1] == ("approval", "→ complete"), events

        code, drawn = await on_terminal(*url, "runs", "events", run_id)
        assert code == 0 and all(len(line) <= 80 for line in drawn.splitlines()), drawn
        assert re.search(rf"^\S+\s+{tail}\s+approve\s+signal\b", drawn, re.M), drawn


async def test_applying_a_file_again_changes_nothing_and_diff_shows_a_change_without_making_it(
        aetr: AetrServer, http: aiohttp.ClientSession, tmp_path: Path) -> None:
    url = ("--url", aetr.url)
    steps = tmp_path / "steps.yaml"
    steps.write_text("name: flow\nkind: sequential\nchildren:\n"
                     "  - step: {name: pause, kind: wait, seconds: 1}\n    mapper: '(input) => input'\n")
    first = await cli(*url, "apply", str(steps))
    assert first.code == 0, first
    assert re.search(r"^created\s+flow\s+version 1$", first.stdout, re.M), first
    assert re.search(r"^created\s+pause\s+version 1\s+\(inline\)$", first.stdout, re.M), first
    again = await cli(*url, "apply", str(steps))
    assert again.code == 0, again
    assert again.stdout.split("\n")[:2] == ["unchanged  flow  version 1", "unchanged  pause  version 1  (inline)"]

    steps.write_text(steps.read_text().replace("seconds: 1", "seconds: 2"))
    diff = await cli(*url, "apply", "--diff", str(steps))
    assert diff.code == 0, diff
    assert "unchanged     flow  version 1" in diff.stdout, diff
    assert "would change  pause  version 2  (inline)" in diff.stdout, diff
    assert "-seconds: 1.0" in diff.stdout and "+seconds: 2.0" in diff.stdout, diff
    assert (await Api(http, aetr.url).call("GET", "/api/v1/steps/pause"))[1]["version"] == 1


async def test_running_a_step_that_does_not_exist_points_to_aetr_apply(aetr: AetrServer) -> None:
    ran = await cli("--url", aetr.url, "run", "nope")
    assert ran.code == 2, ran
    assert ran.stderr == ("error: no step named (or with id) 'nope': create it with `aetr apply FILE`; "
                          "`aetr steps list` shows the steps there are\n"), ran


async def test_apply_of_a_mapper_that_does_not_parse_names_its_line_and_column(
        aetr: AetrServer, tmp_path: Path) -> None:
    steps = tmp_path / "broken.yaml"
    steps.write_text("name: flow\nkind: sequential\nchildren:\n  - step: {name: pause, kind: wait, seconds: 1}\n"
                     "    mapper: |\n      (input) => ({\n        n: input.n,\n        m: ,\n      })\n")
    applied = await cli("--url", aetr.url, "apply", str(steps))
    assert applied.code == 2, applied
    assert applied.stderr == ("error: step 'flow', child 0 ('pause') mapper does not compile (line 3, column 6 of "
                              "the script): SyntaxError: Unexpected token ',' (HTTP 422)\n"), applied
