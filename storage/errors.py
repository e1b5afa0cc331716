"""Errors a user can cause in the store layer; the CLI prints their message
as one line and exits non-zero.

Messages state what is wrong with the store; advice (which command or option
fixes it) is the CLI's, keyed on the error's class and fields
(cli/advice.py). No SQLAlchemy error leaves storage/: the Store turns them
into StoreUnavailable (an outage: the same call succeeds once the store is
back) or StoreRefused (the store refused what was asked; it would refuse it
again).
"""


class StoreError(Exception):
    """A problem with the store the user can fix (wrong URL, wrong revision, bad input)."""


class SchemaMismatch(StoreError):
    """The store's schema revision is not this csr's: `revision` is the store's
    (None: not a csr store), `head` this csr's."""

    def __init__(self, message: str, revision: str | None = None, head: str | None = None, newer: bool = False):
        super().__init__(message)
        self.revision, self.head, self.newer = revision, head, newer


class NoStore(StoreError):
    """No store where the URL points (a SQLite file that does not exist)."""


class NotAStore(StoreError):
    """The database has tables but no csr schema revision."""


class ImportRejected(StoreError):
    pass


class OrderError(StoreError):
    """An iteration step asked for out of order (e.g. generate 2 before model 1 exists)."""


class NotGenerated(OrderError):
    """Iteration `iteration` has prompts left to generate (or was never started)."""

    def __init__(self, iteration: int):
        super().__init__(f"iteration {iteration} has not been generated")
        self.iteration = iteration


class MissingModelVersion(OrderError):
    """Iteration `iteration` needs model version `version`, which does not exist."""

    def __init__(self, iteration: int, version: int):
        super().__init__(f"iteration {iteration} needs model version {version}, which does not exist")
        self.iteration, self.version = iteration, version


class WriteConflict(StoreError):
    """Another writer committed the same unique rows first; the transaction was rolled back."""


class StoreUnavailable(StoreError):
    """The store could not be reached (server down, connection lost, SQLite
    locked past its busy timeout). `detail` is the driver's first line;
    `seconds` how long a bounded retry kept trying (0: it did not retry)."""

    def __init__(self, detail: str, seconds: float = 0.0, bound: float | None = None):
        if bound is None:
            message = f"the store is unreachable: {detail}"
        else:
            message = f"the store was unreachable for {seconds:.0f} s, longer than the retry bound of {bound:g} s: {detail}"
        super().__init__(message)
        self.detail, self.seconds, self.bound = detail, seconds, bound


class StoreRefused(StoreError):
    """The store refused a statement (a constraint, a missing table, a value the
    backend does not take): the same call would fail again."""

    def __init__(self, detail: str):
        super().__init__(f"the store refused the operation: {detail}")
        self.detail = detail
