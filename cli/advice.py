"""What to do about a store error: the CLI's words, added to storage's facts.

Storage says what is wrong (no store at PATH, schema revision X, iteration N
not generated); which command or option fixes it is the command line's to
say, so storage never names a flag.
"""

from __future__ import annotations

from csr.storage import MissingModelVersion, NoStore, NotAStore, NotGenerated, SchemaMismatch


def advice(exc: BaseException) -> str:
    """The advice to print after `exc`'s message ("" when there is none)."""
    if isinstance(exc, NoStore):
        return ": run `csr init` first (or pass --db / CSR_DATABASE_URL)"
    if isinstance(exc, NotAStore):
        return ": point --db / CSR_DATABASE_URL at an empty database or an existing csr store"
    if isinstance(exc, SchemaMismatch) and not exc.newer:
        return ": run `csr init`" if exc.revision is None else ": run `csr db upgrade` (back up the store first)"
    if isinstance(exc, NotGenerated):
        return f": run `csr generate --iter {exc.iteration}`"
    if isinstance(exc, MissingModelVersion):
        return ": run `csr init`" if exc.version == 0 else f": run `csr train --iter {exc.version}` first"
    return ""
