"""Errors a user can cause in the engine; the CLI prints their message as one
line on stderr and exits non-zero."""

from csr.storage.errors import StoreError


class CsrError(Exception):
    """A problem the user can fix: bad option, missing file, unknown model."""


class ModelLoadError(CsrError):
    pass


class SettingsError(ValueError):
    """A settings table refused a key or a value (engine/settings_table.py).
    The message names the key; the caller that knows which file or section it
    came from adds that and raises a CsrError."""


# Everything the CLI reports as a one-line message instead of a traceback.
USER_ERRORS = (CsrError, StoreError)
