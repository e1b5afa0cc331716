"""Generation worker processes and the signals that stop them.

`csr generate --workers K` runs K worker processes on one store, each from a
spec file engine/generate.py writes:

    python -m csr.engine.worker_processes SPEC.json

The spec holds the store's URL, the iteration, its frozen settings and the
worker's options. This module starts the processes (one device and a share
of the CPU threads each), passes stop signals on, and reports their exit
codes; `main` is one process. The store's queue does the rest: the processes
claim, lease and write prompts on their own. A process exits 0 when done; 1
with one line on stderr on an error; 128 + the signal when SIGINT / SIGTERM
stopped it (the prompts in hand are released at once).

Stop signals: the first SIGINT / SIGTERM stops the worker after the prompts
in hand (they are released at once), the second aborts on the spot.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

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


def main(argv: list[str]) -> int:
    """One worker process: claim, search and write prompts until the iteration has none left for it."""
    from csr.engine.errors import error_line
    from csr.engine.worker_loop import WorkerOptions, run_worker
    from csr.storage import Store

    spec = json.loads(Path(argv[0]).read_text())
    iteration = spec["iteration"]
    stop = threading.Event()
    try:
        with Store.open(spec["url"]) as store, StopSignals(stop) as signals:
            stats = run_worker(store, iteration, spec["config"], WorkerOptions(**spec["options"]), stop=stop,
                               say=lambda line: print(line, file=sys.stderr, flush=True))
    except Exception as exc:
        if os.environ.get("CSR_DEBUG", "") not in ("", "0"):
            raise
        print(f"csr: error: {error_line(exc)}", file=sys.stderr, flush=True)
        return 1
    for error in stats.errors:
        print(f"failed: {error}", file=sys.stderr, flush=True)
    if signals.received is not None:
        name = signal.Signals(signals.received).name
        print(f"csr: stopped by {name}: {stats.prompts_done} prompt(s) done, {stats.released} released for the "
              f"next run; worker stopped", file=sys.stderr, flush=True)
        return 128 + signals.received
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    sys.exit(main(sys.argv[1:]))
