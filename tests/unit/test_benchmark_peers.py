"""`benchmarks/run --peers`'s summary: AETR's figures read as ratios to Celery's and the stand-in's."""

from __future__ import annotations

from typing import Any

from benchmarks.peers.summary import render, speed_ratio, summarise, summary_line


def line(system: str, db: str, scenario: str = "chain", case: str | None = None, **figures: Any) -> dict[str, Any]:
    return {"scenario": scenario, "case": case or scenario, "system": system, "db": db, "calibration_ms": 40.0,
            "other_load_pct": 3.0, **figures}


def chain_lines() -> list[dict[str, Any]]:
    return [
        line("standin", "none (standin)", p50_ms=0.25, p99_ms=0.5, steps_per_s=2500.0),
        line("celery", "redis (celery)", p50_ms=5.0, p99_ms=10.0, steps_per_s=200.0),
        line("aetr", "sqlite", p50_ms=1.0, p99_ms=4.0, steps_per_s=700.0),
        line("aetr", "postgres", p50_ms=2.0, p99_ms=20.0, steps_per_s=400.0),
    ]


def test_a_rate_ratio_is_aetr_over_the_peer_and_a_duration_ratio_the_peer_over_aetr() -> None:
    assert speed_ratio(700.0, 2500.0, lower_is_better=False) == 0.28  # AETR makes 0.28x the stand-in's steps/s
    assert speed_ratio(1.0, 5.0, lower_is_better=True) == 5.0  # AETR's gap is a fifth of Celery's: 5x as fast
    assert speed_ratio(20.0, 10.0, lower_is_better=True) == 0.5  # twice as slow reads 0.5x either way


def test_a_missing_or_non_positive_figure_gives_no_ratio() -> None:
    assert speed_ratio(None, 5.0, lower_is_better=True) is None
    assert speed_ratio(1.0, None, lower_is_better=True) is None
    assert speed_ratio(0.0, 5.0, lower_is_better=True) is None


def test_each_figure_gets_aetr_on_each_database_against_each_peer() -> None:
    rows = summarise(chain_lines())

    by_figure = {row.figure.key: row for row in rows}
    assert list(by_figure) == ["p50_ms", "p99_ms", "steps_per_s"]
    assert by_figure["p50_ms"].values == {"standin": 0.25, "celery": 5.0, "aetr sqlite": 1.0, "aetr postgres": 2.0}
    assert by_figure["p50_ms"].ratios == {"sqlite/celery": 5.0, "postgres/celery": 2.5,
                                          "sqlite/standin": 0.25, "postgres/standin": 0.125}
    assert by_figure["p99_ms"].ratios["postgres/celery"] == 0.5
    assert by_figure["steps_per_s"].ratios == {"sqlite/celery": 3.5, "postgres/celery": 2.0,
                                               "sqlite/standin": 0.28, "postgres/standin": 0.16}


def test_a_case_without_a_stand_in_is_compared_with_celery_only() -> None:
    lines = [line("celery", "redis (celery)", "fanout", "fanout-1000", root_complete_s=3.0, all_called_s=2.9),
             line("aetr", "sqlite", "fanout", "fanout-1000", root_complete_s=0.5, all_called_s=0.4)]

    rows = summarise(lines)

    assert [(r.case, r.figure.key) for r in rows] == [("fanout-1000", "root_complete_s"),
                                                      ("fanout-1000", "all_called_s")]
    assert rows[0].ratios == {"sqlite/celery": 6.0}


def test_a_failed_line_leaves_its_cells_empty_instead_of_failing_the_summary() -> None:
    lines = chain_lines()
    lines[1] = {**lines[1], "error": "TimeoutError: the Celery case took more than 1800 s"}

    rows = summarise(lines)
    table = render(rows, lines)

    assert rows[0].values["celery"] is None and rows[0].ratios["sqlite/celery"] is None
    assert rows[0].ratios["sqlite/standin"] == 0.25
    assert "–" in table.splitlines()[2]


def test_the_table_and_the_summary_line_carry_the_machines_speed_over_every_repeat() -> None:
    lines = chain_lines()
    lines[2] = {**lines[2], "samples": {"calibration_ms": [31.0, 58.5, 40.0], "other_load_pct": [1.0, 22.5, 4.0]}}

    rows = summarise(lines)
    table = render(rows, lines)
    summary = summary_line(rows, lines)

    assert "calibration_ms 31–58.5" in table and "at most 22.5%" in table
    header, p50 = table.splitlines()[1:3]
    assert "AETR sqlite vs Celery" in header and "AETR postgres vs stand-in" in header
    assert "5.00×" in p50 and "0.12×" in p50
    assert summary["calibration_ms"] == [31.0, 58.5] and summary["other_load_pct_max"] == 22.5
    assert summary["rows"][0]["aetr_speed_ratio"]["sqlite/celery"] == 5.0


def throughput_repeats(standin: list[float], sqlite: list[float], **aetr_extra: Any) -> list[dict[str, Any]]:
    return [line("standin", "none (standin)", "throughput", transitions_per_s=sorted(standin)[1],
                 samples={"transitions_per_s": standin}),
            line("aetr", "sqlite", "throughput", transitions_per_s=sorted(sqlite)[1],
                 samples={"transitions_per_s": sqlite}, **aetr_extra)]


def test_with_repeats_the_ratio_is_the_median_of_each_repeats_ratio_and_their_range_is_shown() -> None:
    # The machine slowed down in the third repeat: both systems made less there. The ratio of the medians
    # (1,000 / 3,000) would pair the stand-in's fast first repeat with AETR's second.
    lines = throughput_repeats(standin=[4000.0, 3000.0, 2000.0], sqlite=[2000.0, 1000.0, 900.0])

    (row, _) = summarise(lines)
    table = render([row], lines)

    assert row.by_repeat == {"sqlite/standin": [0.5, 0.333, 0.45]}
    assert row.ratios == {"sqlite/standin": 0.45}
    assert "0.45× (0.33–0.50)" in table
    assert summary_line([row], lines)["rows"][0]["aetr_speed_ratio_by_repeat"] == row.by_repeat


def test_repeats_that_cannot_be_paired_fall_back_to_the_ratio_of_the_medians() -> None:
    unequal = throughput_repeats(standin=[4000.0, 3000.0, 2000.0], sqlite=[2000.0, 1000.0])
    failed = throughput_repeats(standin=[4000.0, 3000.0, 2000.0], sqlite=[2000.0, 1000.0, 900.0],
                                failed_repeats=["TimeoutError"])

    for lines in (unequal, failed):
        (row, _) = summarise(lines)
        assert row.by_repeat == {} and row.ratios == {"sqlite/standin": round(row.values["aetr sqlite"] / 3000.0, 3)}
        assert "(" not in render([row], lines).splitlines()[2]
