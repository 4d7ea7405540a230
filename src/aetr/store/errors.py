"""The store's errors: what a caller must tell apart (a lost race, a taken key, an outage, scripts to run)."""

from __future__ import annotations

from aetr.domain import decide


class Conflict(Exception):
    """Another transaction changed a node this one read: the event must be handled again."""


class NeedsScripts(Exception):
    """An event's program asked for scripts while the database was held: run them, then the event again."""

    def __init__(self, requests: list[decide.RunScript]) -> None:
        super().__init__(f"{len(requests)} script(s) to run before the event")
        self.requests = requests


class Duplicate(Exception):
    """A unique key was taken by another transaction (two starts with one idempotency key)."""


class Unavailable(Exception):
    """The database refused or dropped the connection, or is out of connections: an outage to wait out."""


# SQLSTATE classes and codes of an outage rather than a bug: connection exceptions, insufficient resources,
# operator intervention (shutting down, starting up), and "not accepting connections".
OUTAGE_SQLSTATE_CLASSES = ("08", "53", "57")
OUTAGE_SQLSTATES = ("55000",)


def is_outage_sqlstate(code: str | None) -> bool:
    """Whether a SQLSTATE says the database is unavailable (answer 503 and retry) rather than our mistake."""
    return bool(code) and (code[:2] in OUTAGE_SQLSTATE_CLASSES or code in OUTAGE_SQLSTATES)  # type: ignore[index]


class StepsRefused(ValueError):
    """A step change that cannot be stored as asked; `status` is the HTTP status it deserves."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
