"""The web UI: static files (hand-written ES modules, CSS, one index.html) shipped inside the package."""

from __future__ import annotations

import re
from importlib.resources import files
from importlib.resources.abc import Traversable

__all__ = ["MEDIA_TYPES", "static_file"]

MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
    ".json": "application/json",
}
# Names of our own files only: no "..", no hidden files, nothing a browser could use to climb out of static/.
SAFE_PATH = re.compile(r"(?:[A-Za-z0-9_-][A-Za-z0-9_.-]*/)*[A-Za-z0-9_-][A-Za-z0-9_.-]*")


def static_file(path: str) -> tuple[bytes, str] | None:
    """The bytes and media type of `static/<path>`, or None when there is no such file we serve."""
    if not SAFE_PATH.fullmatch(path) or ".." in path:
        return None
    suffix = path[path.rfind("."):] if "." in path else ""
    media_type = MEDIA_TYPES.get(suffix)
    if media_type is None:
        return None
    node: Traversable = files(__name__).joinpath("static")
    for part in path.split("/"):
        node = node.joinpath(part)
    if not node.is_file():
        return None
    return node.read_bytes(), media_type
