"""`aetr serve`: run the application under uvicorn (uvloop and httptools when installed)."""

from __future__ import annotations

import ipaddress
import logging
import sys

import uvicorn

from aetr.config import ConfigError, Settings


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
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)
    from aetr.api.app import create_app

    uvicorn.run(create_app(settings), host=host, port=port, log_level="info", access_log=False)
