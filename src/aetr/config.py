"""Settings read from the environment, with their defaults."""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

from aetr.domain.hosts import SETTING as ALLOWED_HOSTS_SETTING
from aetr.domain.hosts import AllowedHosts
from aetr.domain.steps import DEFAULT_MAX_TREE_NODES
from aetr.store import DEFAULT_DATABASE_URL, DEFAULT_POOL_SIZE

MIB = 1024 * 1024
TEST_CLOCK_SETTING = "AETR_TEST_SCHEDULE_CLOCK"
TEST_CLOCK = re.compile(r"[0-9]{1,12}(\.[0-9]+)?\*[0-9]{1,6}(\.[0-9]+)?")  # Unix time * rate


class ConfigError(ValueError):
    """A setting has a value AETR cannot use."""


def _number(env: Mapping[str, str], key: str, default: float) -> float:
    raw = env.get(key)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{key}={raw!r} is not a number") from None
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{key}={raw!r} must be a finite number greater than 0")
    return value


def _choice(env: Mapping[str, str], key: str, choices: tuple[str, ...]) -> str:
    """One of `choices` (case-insensitive), the first being the default."""
    raw = env.get(key) or choices[0]
    if raw.lower() not in choices:
        raise ConfigError(f"{key}={raw!r}: use one of {', '.join(choices)}")
    return raw.lower()


def _allowed_hosts(env: Mapping[str, str]) -> AllowedHosts | None:
    raw = env.get(ALLOWED_HOSTS_SETTING)
    if raw is None or not raw.strip():
        return None
    try:
        return AllowedHosts.parse(raw)
    except ValueError as exc:
        raise ConfigError(f"{ALLOWED_HOSTS_SETTING}={raw!r}: {exc}") from None


def _test_clock(env: Mapping[str, str]) -> str | None:
    raw = env.get(TEST_CLOCK_SETTING) or None
    if raw is not None and TEST_CLOCK.fullmatch(raw) is None:
        raise ConfigError(f"{TEST_CLOCK_SETTING}={raw!r}: write EPOCH*RATE, e.g. 1767225600*60 (for tests only)")
    return raw


def _whole(env: Mapping[str, str], key: str, default: int) -> int:
    raw = env.get(key)
    if raw is None or raw == "":
        return default
    if not raw.strip().isdigit() or int(raw) < 1:
        raise ConfigError(f"{key}={raw!r} must be a whole number of at least 1")
    return int(raw)


@dataclass(frozen=True)
class Settings:
    """Everything `aetr serve` can be told; see the configuration table in README.md."""

    database_url: str = DEFAULT_DATABASE_URL
    host: str = "127.0.0.1"
    port: int = 9999
    public_url: str | None = None
    api_token: str | None = None
    secret: str | None = None
    max_payload_bytes: int = 16 * MIB
    lease_s: float = 60.0
    poll_s: float = 1.0
    sandbox_time_limit_s: float = 1.0
    sandbox_memory_mb: float = 64.0
    max_in_flight: int = 256
    db_pool_size: int = DEFAULT_POOL_SIZE
    sqlite_synchronous: str = "full"
    allowed_step_hosts: AllowedHosts | None = None  # None: steps may call any host
    keep_alive_s: float = 75.0
    header_timeout_s: float = 10.0
    body_timeout_s: float = 60.0
    max_connections: int = 1000
    max_tree_nodes: int = DEFAULT_MAX_TREE_NODES
    schedule_tick_s: float = 1.0
    test_schedule_clock: str | None = None  # tests only: schedules' time runs faster (see engine.schedules)
    # Run-end notifications: the first wait before trying again, the longest wait, and how long after the
    # run's end tries go on (seconds).
    notify_backoff_s: float = 1.0
    notify_max_backoff_s: float = 300.0
    notify_window_s: float = 3600.0

    @property
    def callback_base(self) -> str:
        """The base URL step services call back on."""
        return (self.public_url or f"http://{self.host}:{self.port}").rstrip("/")

    @staticmethod
    def from_env(env: Mapping[str, str] | None = None, **overrides: object) -> Settings:
        """Settings from AETR_* environment variables, then explicit overrides (e.g. CLI flags)."""
        env = os.environ if env is None else env
        values: dict[str, object] = {
            "database_url": env.get("AETR_DATABASE_URL") or DEFAULT_DATABASE_URL,
            "public_url": env.get("AETR_PUBLIC_URL") or None,
            "api_token": env.get("AETR_API_TOKEN") or None,
            "secret": env.get("AETR_SECRET") or None,
            "max_payload_bytes": int(_number(env, "AETR_MAX_PAYLOAD_BYTES", 16 * MIB)),
            "lease_s": _number(env, "AETR_LEASE_S", 60.0),
            "poll_s": _number(env, "AETR_POLL_S", 1.0),
            "sandbox_time_limit_s": _number(env, "AETR_SANDBOX_TIME_LIMIT_S", 1.0),
            "sandbox_memory_mb": _number(env, "AETR_SANDBOX_MEMORY_MB", 64.0),
            "max_in_flight": int(_number(env, "AETR_MAX_IN_FLIGHT", 256)),
            "db_pool_size": int(_number(env, "AETR_DB_POOL_SIZE", DEFAULT_POOL_SIZE)),
            "sqlite_synchronous": _choice(env, "AETR_SQLITE_SYNCHRONOUS", ("full", "normal")),
            "allowed_step_hosts": _allowed_hosts(env),
            "keep_alive_s": _number(env, "AETR_KEEP_ALIVE_S", 75.0),
            "header_timeout_s": _number(env, "AETR_HEADER_TIMEOUT_S", 10.0),
            "body_timeout_s": _number(env, "AETR_BODY_TIMEOUT_S", 60.0),
            "max_connections": _whole(env, "AETR_MAX_CONNECTIONS", 1000),
            "max_tree_nodes": _whole(env, "AETR_MAX_TREE_NODES", DEFAULT_MAX_TREE_NODES),
            "schedule_tick_s": _number(env, "AETR_SCHEDULE_TICK_S", 1.0),
            "test_schedule_clock": _test_clock(env),
            "notify_backoff_s": _number(env, "AETR_NOTIFY_BACKOFF_S", 1.0),
            "notify_max_backoff_s": _number(env, "AETR_NOTIFY_MAX_BACKOFF_S", 300.0),
            "notify_window_s": _number(env, "AETR_NOTIFY_WINDOW_S", 3600.0),
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        return Settings(**values)  # type: ignore[arg-type]
