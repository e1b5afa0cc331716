"""bench/device_check.sh: the prepared GPU check passes its CPU dry run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_device_check_dry_run_on_cpu():
    env = {**os.environ, "PYTHON": sys.executable, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    done = subprocess.run(
        ["bash", str(ROOT / "bench" / "device_check.sh"), "--device", "cpu"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    assert out.count("speed-up shared/per-row") == 2
    assert "speed-up shared/naive" in out and "peak matmul" in out and "MFU" in out
    assert "before (prefix in every row)" in out
    assert "iteration 1 recorded dtype: bfloat16" in out
    assert "csr train --iter 1: exit 0" in out
    assert out.count("prefix-shared / concatenated:") == 2  # the DPO step bench, both shapes
    assert "device check done" in out
