"""Database outages in the log: one warning when the database goes away and one when it is back, with counts.

An outage is an expected condition: every request it touches is answered 503 with Retry-After and every
background operation is tried again, so a traceback per failure says nothing new and buries the rest of the
log (an 11 s PostgreSQL restart printed 22 of them).
"""

from __future__ import annotations

import logging
import time

from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError

from aetr.store import Unavailable
from aetr.store.sql import is_outage_sqlstate
from aetr.store.store import sqlstate

log = logging.getLogger("aetr.database")


def is_outage(exc: BaseException) -> bool:
    """Whether an exception means the database is unavailable (503, try again) rather than a bug (500)."""
    if isinstance(exc, Unavailable):
        return True
    if not isinstance(exc, DBAPIError):
        return False
    return (exc.connection_invalidated or isinstance(exc, OperationalError | InterfaceError)
            or is_outage_sqlstate(sqlstate(exc)))


class Outage:
    """Whether the database is away, since when, and what failed meanwhile."""

    def __init__(self) -> None:
        self.since: float | None = None
        self.refused = 0  # requests answered 503
        self.retried = 0  # background operations (claims, calls' outcomes, timers) to be tried again

    def failed(self, what: str, cause: str, request: bool = False) -> None:
        """Something could not reach the database; the first failure of an outage is logged."""
        if self.since is None:
            self.since = time.monotonic()
            log.warning("the database is unavailable (%s: %s); requests that need it are answered 503 with "
                        "Retry-After, and background work is retried until it is back", what, cause)
        if request:
            self.refused += 1
        else:
            self.retried += 1

    def reached(self) -> None:
        """The database answered: the end of an outage, if there was one, is logged."""
        if self.since is None:
            return
        log.warning("the database is back after %.1f s; meanwhile %d requests were answered 503 and %d background "
                    "operations were put off to be retried", time.monotonic() - self.since, self.refused,
                    self.retried)
        self.since, self.refused, self.retried = None, 0, 0


OUTAGE = Outage()  # one per process, like the metrics


class QuietDriverDuringOutage(logging.Filter):
    """Drops a database driver's own tracebacks about lost connections while an outage is logged already."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is None:
            return True
        if OUTAGE.since is not None or isinstance(exc, OSError) or is_outage_sqlstate(getattr(exc, "sqlstate", None)):
            OUTAGE.failed(record.name, type(exc).__name__)
            return False
        return True
