"""The benchmark suite's documented command works from a checkout: its smoke run (`--quick`) on each database.

Numbers are not judged here (they come from full runs on a quiet machine, docs/performance.md); what is
checked is that every scenario ran to the end against the real server and reported what it measured.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.e2e.conftest import PG_ADMIN_URL

ROOT = Path(__file__).resolve().parents[2]
DEADLINE_S = 300  # the whole smoke run; it takes about 10 s per database here


@pytest.mark.parametrize("db", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_the_quick_benchmark_runs_every_scenario_to_the_end(db: str, tmp_path: Path) -> None:
    env = {**os.environ, "AETR_BENCH_POSTGRES_URL": PG_ADMIN_URL}
    done = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "--db", db, "--workdir", str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=DEADLINE_S, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    lines: list[dict[str, Any]] = [orjson.loads(line) for line in done.stdout.splitlines() if line.strip()]
    assert [(line["scenario"], line["db"]) for line in lines] == [
        ("chain", db), ("throughput", db), ("fanout", db), ("fanout", db), ("load", db), ("sandbox", db),
        ("map", db), ("map-large", db), ("concurrency", db)]
    assert all(line["quick"] is True and line["met"] is None for line in lines), "quick sizes are never judged"
    chain, throughput, fan_small, fan_large, load, sandbox, mapped, map_large, limited = lines

    assert chain["runs_not_complete"] == 0
    assert chain["gaps"] == chain["runs"] * (chain["steps"] - 1) and chain["p50_ms"] > 0
    assert throughput["runs_started"] == throughput["runs_complete"] == throughput["runs"]
    assert throughput["start_errors"] == [] and throughput["transitions_per_s"] > 0
    for fan in (fan_small, fan_large):
        assert fan["root_state"] == "complete" and fan["output_len"] == fan["children"], fan
        assert fan["peak_rss_mb"] > 0 and fan["root_complete_s"] >= fan["all_called_s"] > 0
    assert (fan_small["children"], fan_large["children"]) == (20, 100)
    assert load["run_round_trips"] == 1 and load["tree_round_trips"] == 1, load
    assert load["run_nodes"] == 100 and load["run_bytes"] > 0
    assert sandbox["calls"] == 200 and 0 < sandbox["p50_ms"] <= sandbox["p99_ms"]
    assert mapped["items"] == mapped["map_output_len"] == mapped["parallel_output_len"] == 100, mapped
    assert mapped["map_state"] == mapped["parallel_state"] == "complete" and mapped["map_to_parallel"] > 0
    assert map_large["large_root_state"] == "complete" and map_large["large_output_len"] == 500, map_large
    assert map_large["peak_rss_mb"] > 0 and map_large["get_ratio"] > 0
    # Three bursts of the limited step and of the chains each, alternating, and one of the free step.
    assert limited["limited_runs_complete"] == 3 * 40 and limited["free_runs_complete"] == 40, limited
    assert limited["chains_runs_complete"] == 3 * 5, limited  # 5 runs of a sequence of 8 calls, 3 times
    assert sorted(limited["order"]) == sorted("lllcccf"), limited
    assert len(limited["limited_to_chains_steady_pairs"]) == 3 and limited["limited_to_chains_steady"] > 0, limited
    assert limited["limited_to_chains"] > 0 and limited["limited_to_free"] > 0, limited
    # The limit holds from a call's arrival to the step's callback; counted on to AETR's answer of the callback,
    # one more may show: the callback's transaction hands the slot on, and the next call may arrive first.
    assert 0 < limited["limited_in_flight_to_callback_max"] <= 5, limited
    assert limited["limited_start_errors"] == limited["free_start_errors"] == limited["chains_start_errors"] == []
    for line in (chain, throughput, fan_small, fan_large):  # the server's cycle collections, read from /metrics
        collections = line["aetr_gc_collections"]
        assert len(collections) == 3 and all(isinstance(n, int) and n >= 0 for n in collections), line
    # `aetr serve` tunes its collector once started (settle_heap): at Python's defaults the fan-out of 100 alone
    # makes about 20 young and 2 middle-aged collections; tuned, none or hardly any.
    assert sum(fan_large["aetr_gc_collections"]) <= 3, fan_large["aetr_gc_collections"]


def test_the_scenarios_run_only_when_named_store_runs_in_bulk_and_measure_before_and_after(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "--db", "sqlite", "--scenario", "stored",
                           "--scenario", "purge", "--workdir", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=DEADLINE_S, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    stored, purge = [orjson.loads(line) for line in done.stdout.splitlines() if line.strip()]
    assert (stored["scenario"], purge["scenario"]) == ("stored", "purge")
    assert stored["stored_runs"] == 5_000 and stored["bytes_per_run"] > 0, stored
    for figure in ("chain_p50_ratio", "chain_p99_ratio", "throughput_ratio", "list_first_ms", "list_filtered_max_ms"):
        assert stored[figure] > 0, (figure, stored)
    assert purge["purge_deleted"] == purge["stored_runs"] == 2_000, purge
    assert purge["callback_answer_p99_ratio"] > 0 and purge["transition_p99_ratio"] > 0, purge


PEERS_DEADLINE_S = 120  # the smoke run of --peers, making Celery's venv included; about 20 s here


def redis_answers(host: str = "127.0.0.1", port: int = 6379) -> bool:
    try:
        with socket.create_connection((host, port), timeout=2) as conn:
            conn.sendall(b"*1\r\n$4\r\nPING\r\n")
            return conn.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def unclaimed_redis_db(host: str = "127.0.0.1", port: int = 6379) -> int:
    """A Redis database number from 12 to 15 that no `benchmarks/run --peers` claims now (another test session
    on this machine may be using one)."""
    for db in range(12, 16):
        with socket.create_connection((host, port), timeout=2) as conn:
            conn.sendall(f"*2\r\n$6\r\nSELECT\r\n${len(str(db))}\r\n{db}\r\n"
                         "*2\r\n$6\r\nEXISTS\r\n$16\r\naetr-peers:owner\r\n".encode())
            answer = b""
            while answer.count(b"\r\n") < 2:
                answer += conn.recv(64)
            if answer.endswith(b":0\r\n"):
                return db
    pytest.fail("Redis databases 12 to 15 are all claimed by other `benchmarks/run --peers` runs")


def test_peers_runs_the_chain_on_the_stand_in_celery_and_aetr_and_prints_the_ratios(tmp_path: Path) -> None:
    if not redis_answers():
        pytest.skip("Redis does not answer on 127.0.0.1:6379 (Celery's broker for --peers)")
    db = unclaimed_redis_db()
    env = {**os.environ, "AETR_BENCH_PEERS_VENV": str(tmp_path / "peers-venv")}  # made afresh, as on first use
    done = subprocess.run([sys.executable, "-m", "benchmarks", "--peers", "--quick", "--scenario", "chain", "--db",
                           "sqlite", "--workdir", str(tmp_path / "work"),
                           # a database of its own, apart from a benchmark run's or another test session's
                           "--peers-redis-url", f"redis://127.0.0.1:6379/{db}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=PEERS_DEADLINE_S, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    *lines, summary = [orjson.loads(line) for line in done.stdout.splitlines() if line.strip()]

    assert [(line["system"], line["db"]) for line in lines] == [
        ("standin", "none (standin)"), ("celery", "redis (celery)"), ("aetr", "sqlite")]
    for line in lines:
        assert line["case"] == "chain" and line["gaps"] == line["runs"] * (line["steps"] - 1) > 0, line
        assert line["runs_not_complete"] == 0 and line["p50_ms"] > 0 and line["calibration_ms"] > 0, line
    celery = lines[1]
    assert celery["peer"]["celery"].startswith("5.") and celery["peer"]["pool"] == "solo", celery["peer"]
    assert celery["cpu_s"]["celery"] > 0, "the worker's CPU is measured"
    p50 = summary["rows"][0]
    assert summary["summary"] == "peers" and p50["figure"] == "p50_ms"
    assert p50["aetr_speed_ratio"]["sqlite/celery"] == round(celery["p50_ms"] / lines[2]["p50_ms"], 3)
    assert "AETR sqlite vs Celery" in done.stderr and "calibration_ms" in done.stderr


def test_peers_without_redis_says_so_and_runs_nothing(tmp_path: Path) -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    done = subprocess.run([sys.executable, "-m", "benchmarks", "--peers", "--quick", "--scenario", "chain", "--db",
                           "sqlite", "--peers-redis-url", f"redis://127.0.0.1:{closed}/11"],
                          cwd=ROOT, env={**os.environ, "AETR_BENCH_PEERS_VENV": str(tmp_path / "never-made")},
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2
    assert f"Redis at redis://127.0.0.1:{closed}/11 does not answer" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and done.stdout == ""
    assert not (tmp_path / "never-made").exists()
