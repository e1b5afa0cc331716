"""Errors a user can cause in the engine; the CLI prints their message as one
line on stderr and exits non-zero."""

from csr.storage import StoreError, StoreRefused, StoreUnavailable, as_store_error, first_line


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


def error_line(exc: BaseException) -> str:
    """The one line csr prints for an error that ends a command or a worker."""
    exc = as_store_error(exc)
    if isinstance(exc, (StoreUnavailable, StoreRefused)):
        # The driver's message goes on with the statement and every parameter
        # row: one line says what went wrong; CSR_DEBUG=1 shows the rest.
        return f"{exc} (CSR_DEBUG=1 for details)"
    if isinstance(exc, USER_ERRORS):
        return str(exc)
    return f"unexpected {first_line(exc)} (CSR_DEBUG=1 for the traceback)"
