"""Run one case on Celery + Redis: benchmarks/peers/celery_side.py in the peers' venv, as a process of its own."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

import orjson

from benchmarks.common import Sizes, calibration_ms
from benchmarks.processes import Process, clean_env, log

CELERY_SIDE: Final = Path(__file__).resolve().parent / "celery_side.py"
DEFAULT_REDIS_URL: Final = "redis://127.0.0.1:6379/11"  # a database number of the benchmark's own: it is flushed
REDIS_TIMEOUT_S: Final = 5.0  # seconds Redis has to answer PING
SCENARIOS: Final = ("chain", "throughput", "fanout")  # what celery_side.py can run


async def check_redis(url: str) -> str | None:
    """None when Redis at `url` answers PING; else why not."""
    parts = urlsplit(url)
    if parts.scheme != "redis":
        return f"{url!r} is not a redis:// URL"
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(parts.hostname or "127.0.0.1", parts.port or 6379), REDIS_TIMEOUT_S)
    except (OSError, TimeoutError) as exc:
        return f"{type(exc).__name__}: {exc}"
    try:
        writer.write(b"*1\r\n$4\r\nPING\r\n")
        answer = await asyncio.wait_for(reader.readline(), REDIS_TIMEOUT_S)
    except (OSError, TimeoutError) as exc:
        return f"{type(exc).__name__}: {exc}"
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    return None if answer.startswith(b"+PONG") else f"it answered PING with {answer[:100]!r}"


async def run_celery_case(label: str, python: Path, sizes: Sizes, workdir: Path, redis_url: str, pool: str,
                          deadline_s: float) -> dict[str, Any]:
    """One case (`chain`, `throughput` or `fanout-N`) on a fresh Redis database and a fresh worker; its metrics."""
    tag = f"{label}-celery-{time.strftime('%H%M%S')}"
    out = workdir / f"{tag}.json"
    args = [str(python), str(CELERY_SIDE), "--scenario", label, "--pool", pool,
            "--chain-steps", str(sizes.chain_steps), "--chain-runs", str(sizes.chain_runs),
            "--throughput-runs", str(sizes.throughput_runs), "--throughput-steps", str(sizes.throughput_steps),
            "--warmup-runs", str(sizes.warmup_runs), "--log", str(workdir / f"{tag}-worker.log"), "--out", str(out)]
    # Nothing of AETR's environment leaks in: the peers' venv imports only what it installed.
    env = {k: v for k, v in clean_env({"AETR_PEERS_REDIS_URL": redis_url}).items() if k != "PYTHONPATH"}
    proc = Process("celery", args, env, workdir / f"{tag}.log")
    speed = calibration_ms()
    started = time.monotonic()
    try:
        proc.start()
        if not await proc.wait_exit(deadline_s):
            raise TimeoutError(f"the Celery case took more than {deadline_s:g} s")
        if proc.popen is not None and proc.popen.returncode != 0:
            raise RuntimeError(f"celery_side.py exited {proc.popen.returncode}: {proc.tail(15)}")
        metrics: dict[str, Any] = orjson.loads(out.read_bytes())
    except (OSError, RuntimeError, TimeoutError, orjson.JSONDecodeError) as exc:
        log(f"{label} on Celery failed: {type(exc).__name__}: {exc}")
        metrics = {"error": f"{type(exc).__name__}: {exc}"[:500]}
    finally:
        await proc.stop()
        with contextlib.suppress(OSError):
            os.unlink(out)
    metrics["wall_s"] = round(time.monotonic() - started, 1)
    metrics["calibration_ms"] = speed
    metrics["other_load_pct"] = metrics.get("cpu_s", {}).get("other_pct", 0.0)
    return metrics
