"""Is a worker's process still running? Answered only for workers on this host.

A worker row records its host, pid and when it registered. On this host, a
pid that no longer exists means the worker is gone. A pid can be reused by
another process: the process now holding it then started after the worker
registered, which /proc tells (Linux). Other hosts cannot be asked; their
workers are judged by their heartbeat alone.
"""

from __future__ import annotations

import os
import socket
from datetime import UTC, datetime
from functools import cache

# /proc start times have a clock tick of precision and the boot time whole
# seconds; a process starting this long after registration cannot be the worker.
_START_SLACK_SECONDS = 2.0


@cache
def this_host() -> str:
    return socket.gethostname()


def _boot_time() -> float | None:
    try:
        with open("/proc/stat") as handle:
            for line in handle:
                if line.startswith("btime "):
                    return float(line.split()[1])
    except OSError:
        return None
    return None


def process_started_at(pid: int) -> float | None:
    """When process `pid` started (seconds since the epoch), or None if unknown."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            stat = handle.read()
    except OSError:
        return None
    boot = _boot_time()
    if boot is None:
        return None
    # The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    fields = stat[stat.rfind(")") + 2 :].split()
    ticks = int(fields[19])  # field 22, starttime, in clock ticks since boot
    return boot + ticks / os.sysconf("SC_CLK_TCK")


def _pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return not _is_zombie(pid)


def _is_zombie(pid: int) -> bool:
    # A killed process whose parent has not reaped it yet still has a pid; it runs no code.
    try:
        with open(f"/proc/{pid}/stat") as handle:
            stat = handle.read()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2 :].split()[0] in ("Z", "X")


def is_gone(host: str, pid: int, registered_at: datetime) -> bool | None:
    """True when the worker's process has certainly ended, False when it runs,
    None when this host cannot tell (the worker runs on another host)."""
    if host != this_host():
        return None
    if pid == os.getpid():
        return False
    if not _pid_exists(pid):
        return True
    started = process_started_at(pid)
    if started is None:
        return False
    registered = registered_at.replace(tzinfo=UTC).timestamp()
    # The worker registers after its process starts; a later start is another process.
    return started > registered + _START_SLACK_SECONDS
