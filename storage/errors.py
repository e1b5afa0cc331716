"""Errors a user can cause in the store layer; the CLI prints their message
as one line and exits non-zero."""


class StoreError(Exception):
    """A problem with the store the user can fix (wrong URL, wrong revision, bad input)."""


class SchemaMismatch(StoreError):
    pass


class ImportRejected(StoreError):
    pass


class OrderError(StoreError):
    """An iteration step asked for out of order (e.g. generate 2 before model 1 exists)."""


class WriteConflict(StoreError):
    """Another writer committed the same unique rows first; the transaction was rolled back."""
