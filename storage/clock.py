"""Timestamps in the store are naive UTC: SQLite has no time zones, and every
process (on any machine) compares leases in the same frame."""

from datetime import UTC, datetime


def utcnow() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)
