"""Telling a store outage from an error in what was written.

An outage (the server restarted, the network dropped, SQLite stayed locked
past its busy timeout) says nothing about the data: the same transaction
succeeds once the store is back, so the caller retries it. Any other
database error (a constraint, a value the backend refuses) would fail again
the same way, so it belongs to the item being written.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

from sqlalchemy.exc import DBAPIError, DisconnectionError, OperationalError, TimeoutError

# sqlite3 raises OperationalError for these when a lock outlived busy_timeout.
_SQLITE_BUSY = ("database is locked", "database is busy", "database table is locked")

MAX_MESSAGE = 240

T = TypeVar("T")


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


def as_store_error(exc: BaseException) -> BaseException:
    """A SQLAlchemy error that escaped the Store's methods (none should) as
    csr's own StoreUnavailable / StoreRefused; any other exception as it is."""
    from sqlalchemy.exc import SQLAlchemyError

    from csr.storage.errors import StoreRefused, StoreUnavailable

    if not isinstance(exc, SQLAlchemyError):
        return exc
    return StoreUnavailable(first_line(exc)) if is_outage(exc) else StoreRefused(first_line(exc))


class OutageRetry:
    """Calls retried with backoff while the store is unreachable, for up to
    `bound_seconds` in a row; past the bound, StoreUnavailable with the time
    it tried. `say` gets one line when the store is lost and one when it is
    back; `retries` counts the calls made again."""

    def __init__(self, reconnect: Callable[[], None], bound_seconds: float, say: Callable[[str], None]):
        self.reconnect, self.bound, self.say = reconnect, bound_seconds, say
        self.retries = 0

    def __call__(self, call: Callable[..., T], *args) -> T:
        from csr.storage.errors import StoreUnavailable

        lost_since = None
        delay = 0.25
        while True:
            try:
                result = call(*args)
            except StoreUnavailable as exc:
                now = time.monotonic()
                if lost_since is None:
                    lost_since = now
                    self.say(f"store unreachable ({exc.detail}); retrying for up to {self.bound:.0f} s")
                if now - lost_since >= self.bound:
                    raise StoreUnavailable(exc.detail, seconds=now - lost_since, bound=self.bound) from exc
                self.retries += 1
                # Connections in the pool may all be dead (a restarted server): start afresh.
                self.reconnect()
                time.sleep(min(delay, max(self.bound - (now - lost_since), 0.05)))
                delay = min(delay * 2, 5.0)
                continue
            if lost_since is not None:
                self.say(f"store reachable again after {time.monotonic() - lost_since:.1f} s")
            return result
