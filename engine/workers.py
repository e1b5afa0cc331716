"""Generation worker processes and the signals that stop them.

`csr generate --workers K` runs K worker processes on one store
(engine/worker_process.py, each from a spec engine/generate.py writes); this
module starts them (one device and a share of the CPU threads each), passes
stop signals on, and reports their exit codes. The store's queue does the
rest: the processes claim, lease and complete prompts on their own.

Stop signals: the first SIGINT / SIGTERM stops the worker after the prompts
in hand (they are released at once), the second aborts on the spot.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopSignals:
    """While entered, SIGINT / SIGTERM set `stop`; a second signal exits at once."""

    def __init__(self, stop: threading.Event, on_signal: Callable[[int], None] | None = None):
        # on_signal runs for every signal received (K worker processes: pass it on).
        self.stop, self.on_signal = stop, on_signal
        self.received: int | None = None
        self.previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        for signum in STOP_SIGNALS:
            self.previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *_exc) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum: int, _frame) -> None:
        name = signal.Signals(signum).name
        if self.on_signal is not None:
            self.on_signal(signum)
        if self.received is not None:
            # Abort on the spot, store untouched: the leases expire (or, on this host,
            # the next worker sees this pid gone) as after SIGKILL.
            print(f"csr: aborted by a second {name}; the prompts in hand go back when their leases end",
                  file=sys.stderr, flush=True)
            os._exit(128 + signum)
        self.received = signum
        print(f"csr: {name}: stopping after the current prompt ({name} again to abort at once)",
              file=sys.stderr, flush=True)
        self.stop.set()


class WorkerProcesses:
    """K worker processes sharing this machine's cores."""

    def __init__(self, commands: Sequence[Sequence[str]]):
        threads = max(1, (os.cpu_count() or 1) // max(len(commands), 1))
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "CSR_TORCH_THREADS": str(threads)}
        # Own session: a terminal's Ctrl-C reaches only this process, which passes
        # each signal on once (a second one then aborts the children too).
        self.children = [subprocess.Popen(list(cmd), env=env, start_new_session=True) for cmd in commands]

    def forward(self, signum: int) -> None:
        for child in self.children:
            if child.poll() is None:
                child.send_signal(signum)

    def running(self) -> bool:
        return any(child.poll() is None for child in self.children)

    def failed(self) -> list[int]:
        """Exit codes of the workers that did not finish cleanly."""
        return [c.returncode for c in self.children if c.returncode != 0]
