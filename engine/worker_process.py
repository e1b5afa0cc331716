"""One generation worker process, started from a spec file by engine/generate.py:

    python -m csr.engine.worker_process SPEC.json

The spec holds the store's URL, the iteration, its frozen settings and the
worker's options. The process claims, searches and writes prompts until the
iteration has none left for it. Exit status: 0 when done; 1 with one line on
stderr on an error; 128 + the signal when SIGINT / SIGTERM stopped it (the
prompts in hand are released at once).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from pathlib import Path

from csr.engine.errors import error_line
from csr.engine.generation import WorkerOptions, run_worker
from csr.engine.workers import StopSignals
from csr.storage.store import Store


def main(argv: list[str]) -> int:
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
