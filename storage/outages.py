"""Telling a store outage from an error in what was written.

An outage (the server restarted, the network dropped, SQLite stayed locked
past its busy timeout) says nothing about the data: the same transaction
succeeds once the store is back, so the caller retries it. Any other
database error (a constraint, a value the backend refuses) would fail again
the same way, so it belongs to the item being written.
"""

from __future__ import annotations

from sqlalchemy.exc import DBAPIError, DisconnectionError, OperationalError, TimeoutError

# sqlite3 raises OperationalError for these when a lock outlived busy_timeout.
_SQLITE_BUSY = ("database is locked", "database is busy", "database table is locked")

MAX_MESSAGE = 240


def is_outage(exc: BaseException) -> bool:
    """True for errors that mean "the store could not be reached", not "the data was refused"."""
    if isinstance(exc, (DisconnectionError, TimeoutError)):  # pool: no connection to be had
        return True
    if not isinstance(exc, DBAPIError):
        return False
    if exc.connection_invalidated:
        return True
    if not isinstance(exc, OperationalError):
        return False
    module = type(exc.orig).__module__ if exc.orig is not None else ""
    if module.startswith("sqlite3"):
        return any(text in str(exc.orig).lower() for text in _SQLITE_BUSY)
    # psycopg: OperationalError covers lost connections, refused connects, admin
    # shutdown, deadlocks and serialisation failures, all of which succeed on retry.
    return True


def first_line(exc: BaseException, limit: int = MAX_MESSAGE) -> str:
    """`Type: first line of the message`, cut to `limit` characters.

    SQLAlchemy puts the statement and every parameter row on the lines after
    the first; only the first says what went wrong.
    """
    inner = exc.orig if isinstance(exc, DBAPIError) and exc.orig is not None else exc
    lines = str(inner).strip().splitlines()
    text = f"{type(inner).__name__}: {lines[0].strip()}" if lines else type(inner).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def store_failure(exc: BaseException) -> str | None:
    """The one line for a database error csr did not expect (an outage, or a
    statement the store refused); None for any other exception."""
    from sqlalchemy.exc import SQLAlchemyError

    if not isinstance(exc, SQLAlchemyError):
        return None
    # SQLAlchemy's message goes on with the statement and every parameter row:
    # one line says what went wrong; CSR_DEBUG=1 shows the rest.
    what = "the store is unreachable" if is_outage(exc) else "the store refused the operation"
    return f"{what}: {first_line(exc)} (CSR_DEBUG=1 for details)"
