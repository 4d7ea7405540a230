"""docs/grafana-dashboard.json: valid JSON whose queries name metrics AETR serves, on a chosen data source."""

from __future__ import annotations

import json
import re
from pathlib import Path

from prometheus_client import REGISTRY

import aetr.engine.metrics  # noqa: F401  # registers the engine's metrics

DASHBOARD = Path(__file__).parents[2] / "docs" / "grafana-dashboard.json"
SUFFIXES = ("_total", "_bucket", "_count", "_sum")


def served_names() -> set[str]:
    """The sample names /metrics can show."""
    return {sample.name for family in REGISTRY.collect() for sample in family.samples} | {
        family.name + suffix for family in REGISTRY.collect() for suffix in ("", *SUFFIXES)}


def test_every_panel_queries_metrics_aetr_serves_on_the_chosen_prometheus() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    names = served_names()
    queried = set()
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        for target in panel["targets"]:
            queried |= set(re.findall(r"\baetr_\w+", target["expr"]))
    assert queried and queried <= names, sorted(queried - names)
    for wanted in ("aetr_runs_ended_total", "aetr_attempt_duration_seconds_bucket", "aetr_step_reports_total",
                   "aetr_oldest_due_work_age_seconds", "aetr_schedule_lag_seconds_bucket",
                   "aetr_notifications_total", "aetr_db_pool_in_use"):
        assert wanted in queried, wanted
