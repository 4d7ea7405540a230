"""Settings read from the environment, with their defaults: one field of `Settings` per AETR_* variable."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from contextvars import ContextVar
from typing import Annotated, Any

from pydantic import BeforeValidator, Field, ValidationError, ValidationInfo
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, NoDecode, PydanticBaseSettingsSource, SettingsConfigDict

from aetr.domain.hosts import AllowedHosts
from aetr.domain.steps import DEFAULT_MAX_TREE_NODES
from aetr.store import DEFAULT_DATABASE_URL, DEFAULT_POOL_SIZE

MIB = 1024 * 1024
ENV_PREFIX = "AETR_"
MAX_WORKERS = 64
MAX_RETENTION_DAYS = 36_525  # a hundred years: any longer is forever, and beyond the calendar's dates


class ConfigError(ValueError):
    """A setting has a value AETR cannot use."""


def env_name(field: str) -> str:
    """The environment variable that sets the field `field` of Settings."""
    return f"{ENV_PREFIX}{field.upper()}"


def _named(info: ValidationInfo) -> str:
    return env_name(info.field_name or "")


def _number(raw: object, info: ValidationInfo) -> float:
    if isinstance(raw, bool):
        raise ValueError(f"{_named(info)}={raw!r} is not a number")
    if isinstance(raw, int | float):
        return float(raw)
    try:
        return float(str(raw))
    except ValueError:
        raise ValueError(f"{_named(info)}={raw!r} is not a number") from None


def _positive(raw: object, info: ValidationInfo) -> float:
    value = _number(raw, info)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{_named(info)}={raw!r} must be a finite number greater than 0")
    return value


def _days(raw: object, info: ValidationInfo) -> float | None:
    """A number of days greater than 0, fractions allowed; unset (None) when not given."""
    if raw is None:
        return None
    try:
        value = _positive(raw, info)
    except ValueError:
        value = math.nan
    if not 0 < value <= MAX_RETENTION_DAYS:
        raise ValueError(f"{_named(info)}={raw!r} must be a number of days greater than 0 and at most "
                         f"{MAX_RETENTION_DAYS}, fractions allowed (e.g. 30 or 0.5); leave it unset to keep runs "
                         "forever")
    return value


def _whole_number(low: int, high: int | None = None) -> Callable[[object, ValidationInfo], int]:
    """A validator of whole numbers from `low` to `high` (no upper bound when None); 1e6 is one, 0.5 is not."""
    wanted = f"of at least {low}" if high is None else f"from {low} to {high}"

    def whole(raw: object, info: ValidationInfo) -> int:
        try:
            value = _number(raw, info)
        except ValueError:
            value = math.nan
        if not value.is_integer() or value < low or (high is not None and value > high):
            raise ValueError(f"{_named(info)}={raw!r} must be a whole number {wanted}")
        return int(value)

    return whole


def _one_of(*choices: str) -> Callable[[object, ValidationInfo], str]:
    """A validator of one of `choices`, case-insensitive."""

    def choice(raw: object, info: ValidationInfo) -> str:
        if not isinstance(raw, str) or raw.lower() not in choices:
            raise ValueError(f"{_named(info)}={raw!r}: use one of {', '.join(choices)}")
        return raw.lower()

    return choice


def _allowed_hosts(raw: object, info: ValidationInfo) -> AllowedHosts | None:
    if raw is None or isinstance(raw, AllowedHosts):
        return raw
    if not isinstance(raw, str):
        raise ValueError(f"{_named(info)}={raw!r}: expected comma-separated hosts")
    if not raw.strip():
        return None
    try:
        return AllowedHosts.parse(raw)
    except ValueError as exc:
        raise ValueError(f"{_named(info)}={raw!r}: {exc}") from None


def _text(raw: object, info: ValidationInfo) -> str | None:
    """A string; an empty one counts as unset."""
    if raw is None or raw == "":
        return None
    if not isinstance(raw, str):
        raise ValueError(f"{_named(info)}={raw!r} must be text")
    return raw


# Tests only: schedules' clock runs RATE times faster from the Unix time EPOCH (see aetr.engine.schedules).
TEST_CLOCK = re.compile(r"[0-9]{1,12}(\.[0-9]+)?\*[0-9]{1,6}(\.[0-9]+)?")


def _test_clock(raw: object, info: ValidationInfo) -> str | None:
    value = _text(raw, info)
    if value is not None and TEST_CLOCK.fullmatch(value) is None:
        raise ValueError(f"{_named(info)}={raw!r}: write EPOCH*RATE, e.g. 1767225600*60 (for tests only)")
    return value


# The kinds of value a setting may have: each checks its value and names the variable when it is wrong.
Positive = Annotated[float, BeforeValidator(_positive)]  # a finite number > 0, e.g. seconds
Days = Annotated[float | None, BeforeValidator(_days)]  # None: unset
Whole = Annotated[int, BeforeValidator(_whole_number(1))]
Count = Annotated[int, BeforeValidator(_whole_number(0))]  # a whole number that may be 0
Port = Annotated[int, BeforeValidator(_whole_number(1, 65535))]
Workers = Annotated[int, BeforeValidator(_whole_number(1, MAX_WORKERS))]
Text = Annotated[str, BeforeValidator(_text)]
OptionalText = Annotated[str | None, BeforeValidator(_text)]
SecretText = Annotated[str | None, BeforeValidator(_text), Field(repr=False)]  # never shown in logs or tracebacks
Synchronous = Annotated[str, BeforeValidator(_one_of("full", "normal"))]
StepCalls = Annotated[str, BeforeValidator(_one_of("inline", "process"))]
# NoDecode: the variable is a comma-separated list, not the JSON that pydantic-settings expects by default.
Hosts = Annotated[AllowedHosts | None, NoDecode, BeforeValidator(_allowed_hosts)]
TestClock = Annotated[str | None, BeforeValidator(_test_clock)]


_GIVEN: ContextVar[Mapping[str, str] | None] = ContextVar("aetr_given_environment", default=None)


class _GivenEnvironment(PydanticBaseSettingsSource):
    """The AETR_* variables of a mapping handed to `Settings.from_env`, read in place of os.environ."""

    def __init__(self, settings_cls: type[BaseSettings], env: Mapping[str, str]) -> None:
        super().__init__(settings_cls)
        self._env = env

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return self._env.get(env_name(field_name)) or None, env_name(field_name), False

    def __call__(self) -> dict[str, Any]:
        # Raw strings, as pydantic-settings hands a variable's value over (NoDecode fields included).
        return {name: self._env[env_name(name)] for name in self.settings_cls.model_fields
                if self._env.get(env_name(name))}


class Settings(BaseSettings):
    """Everything `aetr serve` can be told; see the configuration table in README.md.

    Each field is read from the environment variable AETR_<FIELD NAME>; an empty variable counts as unset.
    """

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_ignore_empty=True, frozen=True,
                                      extra="forbid")

    database_url: Text = DEFAULT_DATABASE_URL
    host: Text = "127.0.0.1"
    port: Port = 9999
    workers: Workers = 1
    public_url: OptionalText = None
    api_token: SecretText = None
    secret: SecretText = None
    max_payload_bytes: Whole = 16 * MIB
    lease_s: Positive = 60.0
    poll_s: Positive = 1.0
    sandbox_time_limit_s: Positive = 1.0
    sandbox_memory_mb: Positive = 64.0
    max_in_flight: Whole = 256
    db_pool_size: Whole = DEFAULT_POOL_SIZE
    sqlite_synchronous: Synchronous = "full"
    allowed_step_hosts: Hosts = None  # None: steps may call any host
    keep_alive_s: Positive = 75.0
    header_timeout_s: Positive = 10.0
    body_timeout_s: Positive = 60.0
    max_connections: Whole = 1000
    # Who makes step calls once a few are under way: the serving process, or a process of their own beside it
    # (see engine.calls).
    step_calls: StepCalls = "inline"
    # Run starts one process handles at once; the others wait for a place (aetr.engine.admission).
    starts_at_once: Whole = 8
    max_pending_starts: Count = 1000  # run starts that may wait for a place at once; the next answers 503
    # Milliseconds a callback should take to answer; new calls wait while callbacks take longer (0: never).
    callback_target_ms: Count = 20
    max_tree_nodes: Whole = DEFAULT_MAX_TREE_NODES
    schedule_tick_s: Positive = 1.0  # seconds between a process's looks for due schedules
    test_schedule_clock: TestClock = None  # tests only: schedules' time runs faster (see engine.schedules)
    # Run-end notifications: the first wait before trying again, the longest wait, and how long after the
    # run's end tries go on (seconds).
    notify_backoff_s: Positive = 1.0
    notify_max_backoff_s: Positive = 300.0
    notify_window_s: Positive = 3600.0
    retention_days: Days = None  # runs that ended longer ago are deleted; None: kept forever

    @property
    def callback_base(self) -> str:
        """The base URL step services call back on."""
        return (self.public_url or f"http://{self.host}:{self.port}").rstrip("/")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Values given as arguments, then the environment (os.environ, or the mapping given to from_env)."""
        given = _GIVEN.get()
        return init_settings, env_settings if given is None else _GivenEnvironment(settings_cls, given)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Settings from AETR_* variables (of os.environ, or of `env` alone), then the overrides that are not
        None (e.g. command-line options); ConfigError naming the variable when a value cannot be used."""
        reading = _GIVEN.set(env)
        try:
            return cls(**{name: value for name, value in overrides.items() if value is not None})
        except ValidationError as exc:
            raise ConfigError("; ".join(_explain(error) for error in exc.errors())) from None
        finally:
            _GIVEN.reset(reading)

    def environ(self, *names: str) -> dict[str, str]:
        """The AETR_* variables that give another process these settings' values of the fields `names`."""
        values = {name: getattr(self, name) for name in names}
        return {env_name(name): str(value) for name, value in values.items() if value is not None}


def _explain(error: Any) -> str:
    """One sentence for one of pydantic's validation errors, naming the variable."""
    cause = error.get("ctx", {}).get("error")
    if isinstance(cause, ValueError):
        return str(cause)  # the validators above already name the variable and the value
    where = ".".join(str(part) for part in error["loc"])
    if error["type"] == "extra_forbidden":
        return f"{where} is not a setting of AETR"
    return f"{env_name(where)}={error['input']!r}: {error['msg']}"
