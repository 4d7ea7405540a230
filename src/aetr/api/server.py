"""`aetr serve`: run the application under uvicorn (uvloop and httptools when installed)."""

from __future__ import annotations

import copy
import gc
import ipaddress
import logging
import math
import os
import sys
from typing import Any

import uvicorn
from uvicorn.config import LOGGING_CONFIG, STARTUP_FAILURE
from uvicorn.supervisors import Multiprocess

from aetr.api.accept import LOOP
from aetr.api.connections import DEFAULT_PROTOCOL, PROTOCOLS, ConnectionLimits, ServerConfig
from aetr.config import ConfigError, Settings
from aetr.domain.urls import redact_userinfo
from aetr.engine.tokens import redact

log = logging.getLogger("aetr.api")


class RedactCallbackTokens(logging.Filter):
    """Blanks out callback tokens and URLs' passwords in log lines: whoever reads a token can report that step's
    result, and a step URL's `user:password@` is shown only in the step's definition."""

    def filter(self, record: logging.LogRecord) -> bool:
        # Arguments are redacted one by one, not merged into the message: uvicorn's access formatter reads them.
        if isinstance(record.msg, str):
            record.msg = _redact(record.msg)
        if isinstance(record.args, tuple):
            record.args = tuple(_redact_arg(a) for a in record.args)
        elif isinstance(record.args, dict):
            record.args = {k: _redact_arg(v) for k, v in record.args.items()}
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = _redact(record.exc_text)
        if record.stack_info:
            record.stack_info = _redact(record.stack_info)
        return True


def _redact_arg(value: Any) -> Any:
    if isinstance(value, int | float | bool) or value is None:
        return value  # keeps %d and %f formatting working
    return _redact(value if isinstance(value, str) else str(value))


def _redact(text: str) -> str:
    return redact_userinfo(redact(text))


def log_config() -> dict[str, Any]:
    """uvicorn's logging configuration, with callback tokens and URLs' passwords blanked out of every line."""
    config = copy.deepcopy(LOGGING_CONFIG)
    config["filters"] = {"redact": {"()": RedactCallbackTokens}}
    for handler in config["handlers"].values():
        handler["filters"] = ["redact"]
    return config


def is_loopback(host: str) -> bool:
    """Whether `host` only listens on this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# What `serve` was told besides the environment, handed to its worker processes as AETR_* variables.
PASSED_TO_WORKERS = ("host", "port", "database_url", "api_token")


def serve(insecure: bool = False, **overrides: Any) -> None:
    """Start the server in the foreground; exit with a message when the settings cannot work.

    `overrides` (e.g. host, port, workers, database_url, api_token from the command line) take precedence
    over the environment; None means "not given". `workers` processes (AETR_WORKERS, default 1) serve one
    port, each with its own engine: on a machine with several cores, the events, HTTP and step calls of one
    process are bound to one core by Python.
    """
    try:
        settings = Settings.from_env(**overrides)
    except ConfigError as exc:
        sys.exit(f"aetr: {exc}")
    if not is_loopback(settings.host) and settings.api_token is None and not insecure:
        sys.exit(f"aetr: refusing to listen on {settings.host} without AETR_API_TOKEN: anyone who can reach it "
                 "could start runs. Set AETR_API_TOKEN, or pass --insecure if the network is trusted.")
    configure_logging()
    try:
        # Worker processes inherit the raised limit.
        settings = fit_connections(settings, raise_open_file_limit())
    except ConfigError as exc:
        sys.exit(f"aetr: {exc}")
    logs: dict[str, Any] = {"log_level": "info", "access_log": False, "log_config": log_config()}
    # The schema is brought up to date once, here, before any worker starts (each would otherwise race to),
    # and a database this release cannot serve is refused with a sentence rather than a traceback.
    from aetr.store.migrate import SchemaTooNew, upgrade

    try:
        upgrade(settings.database_url)
    except SchemaTooNew as exc:
        sys.exit(f"aetr: {exc}")
    if settings.workers == 1:
        from aetr.api.app import create_app

        run(server_config(settings, create_app(settings, on_started=settle_heap), **logs))
        return
    os.environ.update(settings.environ(*PASSED_TO_WORKERS))
    run(server_config(settings, "aetr.api.server:worker_app", factory=True, workers=settings.workers, **logs))


def server_config(settings: Settings, app: Any, protocol: str = DEFAULT_PROTOCOL, **options: Any) -> ServerConfig:
    """uvicorn's configuration for `app` under these settings: `aetr serve` and the tests' servers use it.

    The HTTP protocol is uvicorn's own (httptools when installed, else h11) with AETR's limits on reading a
    request and on open connections; idle connections are kept AETR_KEEP_ALIVE_S. The loop takes every waiting
    connection at each turn (`api.accept`).
    """
    limits = ConnectionLimits(header_timeout_s=settings.header_timeout_s, body_timeout_s=settings.body_timeout_s,
                              max_connections=settings.max_connections)
    return ServerConfig(app, limits=limits, http=PROTOCOLS[protocol], host=settings.host, port=settings.port,
                        timeout_keep_alive=math.ceil(settings.keep_alive_s), **{"loop": LOOP, **options})


def run(config: ServerConfig) -> None:
    """Serve `config` in the foreground, in `config.workers` processes; exit with an error when it cannot start."""
    server = uvicorn.Server(config)
    try:
        if config.workers > 1:
            Multiprocess(config, sockets=[config.bind_socket()]).run()
        else:
            server.run()
    except KeyboardInterrupt:
        pass
    if config.workers == 1 and not server.started:
        sys.exit(STARTUP_FAILURE)


FILES_RESERVED = 100  # open files a process needs besides connections and pools: logs, sandbox pipes, SQLite's
MIN_CONNECTIONS = 16  # fewer than this left under the open-file limit: refuse to start
NOFILE_CEILING = 1 << 20  # the open-file limit asked for when the hard limit is unlimited


def raise_open_file_limit() -> int | None:
    """Raise this process's soft limit on open files to its hard limit; the limit now in force (None: unknown)."""
    try:
        import resource
    except ImportError:  # not a POSIX system
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = NOFILE_CEILING if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            soft = want
        except (ValueError, OSError):  # the system caps it lower (e.g. fs.nr_open): keep the soft limit
            pass
    return None if soft == resource.RLIM_INFINITY else soft


def fit_connections(settings: Settings, open_files: int | None) -> Settings:
    """The settings with AETR_MAX_CONNECTIONS lowered, if needed, so that the connections, the database pool
    and the step calls fit under the process's open-file limit: the process keeps accepting (and /healthz
    keeps answering) however many sockets clients open."""
    if open_files is None:
        return settings
    room = open_files - settings.db_pool_size - settings.max_in_flight - FILES_RESERVED
    if room >= settings.max_connections:
        return settings
    if room < MIN_CONNECTIONS:
        raise ConfigError(
            f"this process may open only {open_files} files (ulimit -n), too few for AETR_DB_POOL_SIZE="
            f"{settings.db_pool_size}, AETR_MAX_IN_FLIGHT={settings.max_in_flight} and {MIN_CONNECTIONS} client "
            f"connections: raise the limit (ulimit -n, or LimitNOFILE= under systemd) or lower those settings")
    log.warning("AETR_MAX_CONNECTIONS=%d lowered to %d: this process may open %d files (ulimit -n) and keeps %d "
                "of them for its database pool, step calls and own files; raise the limit to allow more",
                settings.max_connections, room, open_files, open_files - room)
    return settings.model_copy(update={"max_connections": room})


def configure_logging() -> None:
    """Log lines to stderr, with callback tokens and URLs' passwords blanked out (also in each worker process)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for handler in logging.getLogger().handlers:
        handler.addFilter(RedactCallbackTokens())
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)


def worker_app() -> Any:
    """The application of one worker process of `aetr serve --workers N` (uvicorn calls it in the worker)."""
    from aetr.api.app import create_app

    configure_logging()
    return create_app(Settings.from_env(), on_started=settle_heap)


GC_YOUNG_THRESHOLD = 50_000  # allocations between collections of the youngest generation (Python's default: 700)


def settle_heap() -> None:
    """Tune the cycle collector once the server has started.

    What the server built to start (modules, the application, compiled statements, pools) is kept out of the
    collector's walks, which otherwise re-visit all of it at every full collection (gc.freeze, as the gc
    module's documentation suggests for long-lived objects). The youngest generation is collected every
    50,000 allocations instead of 700: every event allocates hundreds of short-lived objects, nearly all
    freed by reference counting, and at 700 the collector ran thousands of times a minute under load.
    """
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, older, oldest)
