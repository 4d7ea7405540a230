"""`aetr serve`: run the application under uvicorn (uvloop and httptools when installed)."""

from __future__ import annotations

import copy
import ipaddress
import logging
import sys
from typing import Any

import uvicorn
from uvicorn.config import LOGGING_CONFIG

from aetr.config import ConfigError, Settings
from aetr.engine.tokens import redact


class RedactCallbackTokens(logging.Filter):
    """Blanks out callback tokens in log lines: whoever reads a token can report that step's result."""

    def filter(self, record: logging.LogRecord) -> bool:
        # Arguments are redacted one by one, not merged into the message: uvicorn's access formatter reads them.
        if isinstance(record.msg, str):
            record.msg = redact(record.msg)
        if isinstance(record.args, tuple):
            record.args = tuple(_redact_arg(a) for a in record.args)
        elif isinstance(record.args, dict):
            record.args = {k: _redact_arg(v) for k, v in record.args.items()}
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True


def _redact_arg(value: Any) -> Any:
    if isinstance(value, int | float | bool) or value is None:
        return value  # keeps %d and %f formatting working
    return redact(value if isinstance(value, str) else str(value))


def log_config() -> dict[str, Any]:
    """uvicorn's logging configuration, with callback tokens blanked out of every line its handlers write."""
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


def serve(host: str = "127.0.0.1", port: int = 9999, insecure: bool = False) -> None:
    """Start the server in the foreground; exit with a message when the settings cannot work."""
    try:
        settings = Settings.from_env(host=host, port=port)
    except ConfigError as exc:
        sys.exit(f"aetr: {exc}")
    if not is_loopback(host) and settings.api_token is None and not insecure:
        sys.exit(f"aetr: refusing to listen on {host} without AETR_API_TOKEN: anyone who can reach it could "
                 "start runs. Set AETR_API_TOKEN, or pass --insecure if the network is trusted.")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for handler in logging.getLogger().handlers:
        handler.addFilter(RedactCallbackTokens())
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)
    from aetr.api.app import create_app

    uvicorn.run(create_app(settings), host=host, port=port, log_level="info", access_log=False,
                log_config=log_config())
