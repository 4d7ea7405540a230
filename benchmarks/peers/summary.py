"""The `--peers` summary: each figure for each system, and AETR's speed as a multiple of Celery's and the stand-in's.

Every ratio reads the same way, whichever way its figure goes: how many times as fast AETR is (above 1: AETR
is faster). For a rate (steps per second) that is AETR's over the peer's; for a duration (a gap, a completion
time) the peer's over AETR's.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final

Line = dict[str, Any]


@dataclass(frozen=True)
class Figure:
    """A number of a result line that the summary compares."""

    key: str
    label: str
    lower_is_better: bool


FIGURES: Final[dict[str, tuple[Figure, ...]]] = {
    "chain": (Figure("p50_ms", "gap between steps p50 (ms)", True),
              Figure("p99_ms", "gap between steps p99 (ms)", True),
              Figure("steps_per_s", "steps/s, one run at a time", False)),
    "throughput": (Figure("transitions_per_s", "step transitions/s", False), Figure("runs_per_s", "runs/s", False)),
    "fanout": (Figure("root_complete_s", "parent complete (s)", True),
               Figure("all_called_s", "every child started (s)", True)),
}
PEERS: Final = ("celery", "standin")
PEER_NAMES: Final = {"celery": "Celery", "standin": "stand-in"}


@dataclass(frozen=True)
class Row:
    """One figure of one case: its value per column (system, or AETR on a database) and AETR's ratios."""

    case: str
    figure: Figure
    values: dict[str, float | None]  # "celery", "standin", "aetr sqlite", "aetr postgres"
    ratios: dict[str, float | None]  # "sqlite/celery", "postgres/standin", …
    by_repeat: dict[str, list[float]] = field(default_factory=dict)  # each repeat's ratio, where there are several


def column(line: Line) -> str:
    """The summary column a result line fills."""
    system = str(line.get("system", "aetr"))
    return f"aetr {line['db']}" if system == "aetr" else system


def number(line: Line | None, key: str) -> float | None:
    """A finite figure of a line that did not fail; None otherwise."""
    if line is None or "error" in line:
        return None
    return _figure(line.get(key))


def _figure(value: Any) -> float | None:
    """`value` as a figure: a number that is not NaN; None otherwise."""
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        return None
    return float(value)


def speed_ratio(aetr: float | None, peer: float | None, lower_is_better: bool) -> float | None:
    """How many times as fast AETR is as the peer on one figure; None when either value is missing or not positive."""
    if aetr is None or peer is None or aetr <= 0 or peer <= 0:
        return None
    return round(peer / aetr if lower_is_better else aetr / peer, 3)


def repeat_ratios(aetr: Line | None, peer: Line | None, figure: Figure) -> list[float]:
    """AETR's ratio to the peer in each repeat, where both ran every repeat of the case (`--repeat N`, N ≥ 2).

    The systems take their turns within a repeat, minutes apart, and the machine's speed drifts more between
    repeats than within one: a repeat's ratio leaves most of that drift out, where a ratio of the medians of N
    runs each would not. Empty when the repeats cannot be paired (one failed, a figure is missing)."""
    if aetr is None or peer is None or "failed_repeats" in aetr or "failed_repeats" in peer:
        return []
    mine, theirs = (line.get("samples", {}).get(figure.key) for line in (aetr, peer))
    if not isinstance(mine, list) or not isinstance(theirs, list) or len(mine) != len(theirs) or len(mine) < 2:
        return []
    ratios = [speed_ratio(_figure(a), _figure(p), figure.lower_is_better) for a, p in zip(mine, theirs, strict=True)]
    return [] if None in ratios else [r for r in ratios if r is not None]


def summarise(lines: Sequence[Line]) -> list[Row]:
    """The rows of the summary, in the order the cases' lines came."""
    by_case: dict[str, dict[str, Line]] = {}
    scenario_of: dict[str, str] = {}
    for line in lines:
        case = str(line.get("case", line["scenario"]))
        by_case.setdefault(case, {})[column(line)] = line
        scenario_of[case] = str(line["scenario"])
    rows = []
    for case, columns in by_case.items():
        dbs = [c.removeprefix("aetr ") for c in columns if c.startswith("aetr ")]
        for figure in FIGURES.get(scenario_of[case], ()):
            values = {name: number(line, figure.key) for name, line in columns.items()}
            ratios: dict[str, float | None] = {}
            by_repeat: dict[str, list[float]] = {}
            for peer in PEERS:
                if peer not in values:
                    continue
                for db in dbs:
                    key = f"{db}/{peer}"
                    each = repeat_ratios(columns[f"aetr {db}"], columns[peer], figure)
                    if each:  # the median of the repeats' ratios
                        by_repeat[key] = each
                        ratios[key] = round(statistics.median(each), 3)
                    else:
                        ratios[key] = speed_ratio(values[f"aetr {db}"], values[peer], figure.lower_is_better)
            rows.append(Row(case, figure, values, ratios, by_repeat))
    return rows


def _fmt(value: float | None, ratio: bool = False) -> str:
    if value is None:
        return "–"
    if ratio:
        return f"{value:.2f}×"
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"


def conditions(lines: Sequence[Line]) -> dict[str, Any]:
    """The machine's speed (calibration_ms) and the most other work took of it, over every repeat of every line."""
    speeds = [s for line in lines for s in _samples(line, "calibration_ms")]
    other = [s for line in lines for s in _samples(line, "other_load_pct")]
    return {"calibration_ms": [min(speeds), max(speeds)] if speeds else None,
            "other_load_pct_max": max(other) if other else None}


def _samples(line: Line, key: str) -> list[float]:
    values = line.get("samples", {}).get(key) or [line.get(key)]
    return [float(v) for v in values if isinstance(v, int | float) and not math.isnan(v)]


def render(rows: Sequence[Row], lines: Sequence[Line]) -> str:
    """The summary as a text table, for people."""
    value_cols = [c for c in ("standin", "celery", "aetr sqlite", "aetr postgres") if any(c in r.values for r in rows)]
    ratio_cols = list(dict.fromkeys(k for r in rows for k in r.ratios))
    heads = ["case", "figure", *(PEER_NAMES.get(c, c.replace("aetr", "AETR")) for c in value_cols),
             *(f"AETR {k.split('/')[0]} vs {PEER_NAMES[k.split('/')[1]]}" for k in ratio_cols)]
    body = [[r.case, r.figure.label, *(_fmt(r.values.get(c)) for c in value_cols),
             *(_fmt(r.ratios.get(k), ratio=True) + _spread(r.by_repeat.get(k)) for k in ratio_cols)] for r in rows]
    widths = [max(len(row[i]) for row in [heads, *body]) for i in range(len(heads))]
    text = ["  ".join(cell.ljust(w) if i < 2 else cell.rjust(w)
                      for i, (cell, w) in enumerate(zip(row, widths, strict=True))) for row in [heads, *body]]
    cond = conditions(lines)
    speed = cond["calibration_ms"]
    text.insert(0, "AETR against its peers; ratios: how many times as fast AETR is (above 1: AETR is faster); with"
                   " repeats, the median of the repeats' ratios (their range in brackets)")
    text.append(f"calibration_ms {speed[0]:g}–{speed[1]:g}" if speed else "calibration_ms unknown")
    if cond["other_load_pct_max"] is not None:
        text[-1] += f"; other work took at most {cond['other_load_pct_max']:g}% of the machine while measured"
    return "\n".join(text)


def _spread(each: list[float] | None) -> str:
    return f" ({min(each):.2f}–{max(each):.2f})" if each else ""


def summary_line(rows: Sequence[Row], lines: Sequence[Line]) -> Line:
    """The summary as one JSON line, for programs."""
    return {"summary": "peers", "ratio": "how many times as fast AETR is as the peer (above 1: AETR is faster)",
            **conditions(lines),
            "rows": [{"case": r.case, "figure": r.figure.key, "lower_is_better": r.figure.lower_is_better,
                      "values": r.values, "aetr_speed_ratio": r.ratios, "aetr_speed_ratio_by_repeat": r.by_repeat}
                     for r in rows]}
