"""Generation worker processes and the signals that stop them.

`csr generate --workers K` runs K `csr generate` processes on one store; this
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

from csr.engine.generation import WorkerOptions

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


def worker_commands(csr: Sequence[str], iteration: int, search_overrides: dict, options: WorkerOptions,
                    devices: Sequence[str]) -> list[list[str]]:
    """One `csr generate` command per device. `csr` is the console script with
    its store options; `options.limit` is shared out between the workers."""
    per_worker_limit = None if options.limit is None else -(-options.limit // len(devices))
    commands = []
    for device in devices:
        cmd = [
            *csr, "generate", "--iter", str(iteration), "--device", device,
            "--batch-prompts", str(options.batch_prompts), "--lease-seconds", str(options.lease_seconds),
            "--max-attempts", str(options.max_attempts), "--quiet",
            "--store-retry-seconds", str(options.store_retry_seconds),
        ]
        if not options.wait:
            cmd.append("--no-wait")
        for key, flag in (("preset", "--preset"), ("lam", "--lambda"), ("select_by", "--select-by")):
            if key in search_overrides:
                cmd += [flag, str(search_overrides[key])]
        if per_worker_limit is not None:
            cmd += ["--limit", str(per_worker_limit)]
        if options.dtype is not None:
            cmd += ["--dtype", options.dtype]
        if options.kv_budget is not None:
            cmd += ["--kv-budget", str(options.kv_budget / 2**30)]
        commands.append(cmd)
    return commands


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
