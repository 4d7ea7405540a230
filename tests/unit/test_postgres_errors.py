"""What the PostgreSQL store makes of asyncpg's errors: a lost race, a taken key, or an outage to wait out."""

from __future__ import annotations

import asyncpg
import pytest

from aetr.engine.outage import is_outage
from aetr.store.errors import Conflict, Duplicate, Unavailable
from aetr.store.postgres import _translated


@pytest.mark.parametrize(("raised", "becomes"), [
    (asyncpg.SerializationError("could not serialize access"), Conflict),
    (asyncpg.DeadlockDetectedError("deadlock detected"), Conflict),
    (asyncpg.UniqueViolationError("duplicate key value"), Duplicate),
    (asyncpg.AdminShutdownError("terminating connection due to administrator command"), Unavailable),
    (asyncpg.TooManyConnectionsError("too many connections for role"), Unavailable),
    (asyncpg.ConnectionDoesNotExistError("connection was closed in the middle of operation"), Unavailable),
    (ConnectionResetError("reset by peer"), Unavailable),
    # A server process ended mid-statement can leave asyncpg's connection waiting for the rest of the answer:
    # using it again fails so (seen in the outage test, as the database went down during a write).
    (asyncpg.InternalClientError("cannot switch to state 12; another operation (2) is in progress"), Unavailable),
])
def test_asyncpg_errors_become_the_stores_own(raised: Exception, becomes: type[Exception]) -> None:
    with pytest.raises(becomes), _translated():
        raise raised


def test_an_unavailable_database_is_an_outage_to_wait_out_not_a_bug() -> None:
    with pytest.raises(Unavailable) as caught, _translated():
        raise asyncpg.InternalClientError("cannot switch to state 12; another operation (2) is in progress")
    assert is_outage(caught.value)


def test_any_other_error_is_left_as_it_is_a_bug_to_see() -> None:
    with pytest.raises(asyncpg.UndefinedColumnError), _translated():
        raise asyncpg.UndefinedColumnError('column "nope" does not exist')
