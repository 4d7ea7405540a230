"""Schedules in the files `aetr apply` reads: told apart from steps by `kind: schedule`, checked before any PUT."""

from __future__ import annotations

import pytest

from aetr.cli.main import parse_step_definitions
from aetr.cli.schedules import ScheduleFileError, schedules_table, split_schedules

FILE = """\
name: report
kind: wait
seconds: 1
---
kind: schedule
name: nightly
step: report
cron: '30 2 * * *'
timezone: Europe/Paris
input: {day: yesterday}
"""


def test_schedule_documents_are_split_from_the_steps_and_sent_without_their_kind() -> None:
    steps, schedules = split_schedules(parse_step_definitions(FILE, "flow.yaml"), "flow.yaml")
    assert [s["name"] for s in steps] == ["report"]
    assert schedules == [{"name": "nightly", "step": "report", "cron": "30 2 * * *", "timezone": "Europe/Paris",
                          "input": {"day": "yesterday"}}]


def test_a_schedule_with_a_name_that_cannot_be_a_path_segment_is_refused_before_anything_is_applied() -> None:
    for name in ("..", None, 7):
        with pytest.raises(ScheduleFileError, match=f"flow.yaml: schedule '{name}': a schedule needs a \"name\""):
            split_schedules([{"kind": "schedule", "name": name, "step": "report", "cron": "* * * * *"}], "flow.yaml")


def test_the_table_shows_paused_schedules_and_the_latest_run_state() -> None:
    from rich.console import Console

    from aetr.cli import render

    table = schedules_table([
        {"name": "nightly", "step": "report", "cron": "30 2 * * *", "timezone": "Europe/Paris", "enabled": True,
         "next_run_at": "2026-05-01T00:30:00+00:00", "last_runs": [{"state": "complete"}, {"state": "error"}]},
        {"name": "weekly", "step": "report", "cron": "0 4 * * 0", "timezone": "UTC", "enabled": False,
         "next_run_at": None, "last_runs": []}])
    header, nightly, weekly = render.tab_separated(table).splitlines()
    assert header.split("\t") == ["name", "step", "cron", "tz", "enabled", "next run (UTC)", "last run"]
    assert nightly.split("\t") == ["nightly", "report", "30 2 * * *", "Europe/Paris", "yes", "2026-05-01 00:30:00",
                                   "complete"]
    assert weekly.split("\t")[-3:] == ["paused", "paused", "-"]
    console = Console(width=80, record=True)
    console.print(render.drawn(table, 80))
    lines = console.export_text().splitlines()
    assert len(lines) == 3 and all(len(line) <= 80 for line in lines)  # at 80 columns: one line a schedule
    assert "2026-05-01 00:30:00" in lines[1] and "30 2 * * *" in lines[1]


def test_the_readmes_schedule_is_one_aetr_apply_and_the_api_accept() -> None:
    import re
    from pathlib import Path

    from aetr.api.schedules import ScheduleIn

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    (block,) = [b for b in re.findall(r"```yaml\n(.*?)```", readme, re.S) if "kind: schedule" in b]
    steps, (schedule,) = split_schedules(parse_step_definitions(block, "README.md"), "README.md")
    assert steps == []
    stored = ScheduleIn(**{k: v for k, v in schedule.items() if k != "name"})
    assert (stored.cron, stored.timezone, stored.notify) == ("30 2 * * *", "Europe/Paris",
                                                             "https://hooks.example.com/aetr")
