"""`csr generate`: whole trees per prompt, frozen settings, order rules,
crash recovery with a real SIGKILL, and concurrent workers on both backends."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import time

import pytest

from tests.db_backends import CSR_SCRIPT, fingerprint
from tests.study import make_study

# End to end (generation runs; real processes where they are killed or run side by side):
# the full suite (make test), not the fast lane (make check).
pytestmark = pytest.mark.slow


@pytest.fixture
def study(tmp_path, store_url, trained_llava_dir, tiny_clip_dir):
    return make_study(tmp_path, store_url, trained_llava_dir, tiny_clip_dir)


def _trees(study) -> dict[int, list[tuple]]:
    rows = study.query(
        "SELECT prompt_id, node, parent_node, depth, text, is_final FROM candidates "
        "WHERE iteration = 1 ORDER BY prompt_id, node"
    )
    trees: dict[int, list[tuple]] = {}
    for row in rows:
        trees.setdefault(row[0], []).append(row[1:])
    return trees


def _assert_complete_trees(study, trees):
    assert len(trees) == study.prompts
    for nodes in trees.values():
        numbers = [n[0] for n in nodes]
        assert numbers == list(range(len(nodes))), "nodes of one tree are numbered without gaps"
        for _node, parent, depth, _text, _final in nodes:
            if parent is None:
                assert depth == 0
            else:
                assert nodes[parent][2] == depth - 1, "a child is one level below its parent"
        assert any(n[4] for n in nodes), "every tree has a final response"


def test_generate_writes_one_whole_tree_per_prompt(study):
    done = study.invoke("generate", "--iter", "1", "--quiet")
    assert done.returncode == 0, done.stderr
    trees = _trees(study)
    _assert_complete_trees(study, trees)
    assert study.query("SELECT state, COUNT(*) FROM work_items GROUP BY state") == [("done", study.prompts)]
    assert study.query("SELECT state, policy_version, preset FROM iterations") == [("generated", 0, "paper")]
    # Every candidate carries its raw scores; R(s) follows eq. 4 with lambda 0.9.
    for r_t, r_i, reward, lp in study.query(
        "SELECT r_t, r_i, reward, logprob_sum FROM candidates WHERE exclusion_reason IS NULL AND text <> ''"
    ):
        assert 0.0 <= r_t <= 1.0 and r_i >= 0.0
        assert r_t == pytest.approx(math.exp(lp), rel=1e-6)
        assert reward == pytest.approx(0.9 * r_i + 0.1 * r_t, rel=1e-6)

    again = study.invoke("generate", "--iter", "1", "--quiet")
    assert again.returncode == 0, again.stderr
    assert _trees(study) == trees, "a second run over a finished iteration changes nothing"


def test_generate_refuses_other_settings_and_wrong_order(study):
    assert study.invoke("generate", "--iter", "1", "--limit", "1", "--quiet").returncode == 0
    before = fingerprint(study.url)
    other = study.invoke("generate", "--iter", "1", "--lambda", "0.5")
    assert other.returncode != 0
    assert "iteration 1 was started with other settings" in other.stderr
    assert "lam" in other.stderr and "Traceback" not in other.stderr
    too_early = study.invoke("generate", "--iter", "2")
    assert too_early.returncode != 0
    assert "needs model version 1" in too_early.stderr and "csr train --iter 1" in too_early.stderr
    assert fingerprint(study.url) == before


def test_failed_prompt_is_recorded_and_the_run_goes_on(study):
    (study.directory / "images" / "0.png").write_bytes(b"not an image any more")
    done = study.invoke("generate", "--iter", "1", "--quiet", "--max-attempts", "2")
    assert done.returncode == 0, done.stderr
    states = dict(study.query("SELECT state, COUNT(*) FROM work_items GROUP BY state"))
    assert states == {"done": study.prompts - 1, "failed": 1}
    [(attempts, error)] = study.query("SELECT attempts, last_error FROM work_items WHERE state = 'failed'")
    assert attempts == 2 and "0.png" in error
    # One line per failure, no traceback: the worker's stderr stays readable.
    assert "Traceback" not in done.stderr
    assert max(len(line) for line in done.stderr.splitlines()) <= 300, done.stderr


def _start_worker(study, *extra):
    env = {k: v for k, v in os.environ.items() if k != "CSR_DATABASE_URL"}
    return subprocess.Popen(
        [str(CSR_SCRIPT), "--db", study.url, "generate", "--iter", "1", "--quiet", *extra],
        cwd=study.directory,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_kill_9_then_rerun_leaves_exactly_one_tree_per_prompt(study, tmp_path_factory, backend):
    reference_dir = tmp_path_factory.mktemp("reference")
    # The search is deterministic: a clean run in a second store is what every tree must equal.
    reference = make_study(reference_dir, f"sqlite:///{reference_dir / 'ref.db'}",
                           *_model_dirs(study))
    assert reference.invoke("generate", "--iter", "1", "--quiet").returncode == 0

    worker = _start_worker(study, "--batch-prompts", "2", "--lease-seconds", "3")
    deadline = time.time() + 120
    while time.time() < deadline:
        done = study.query("SELECT COUNT(*) FROM work_items WHERE state = 'done'")[0][0]
        if done >= 1:
            break
        time.sleep(0.05)
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    assert worker.returncode == -signal.SIGKILL
    claimed = study.query("SELECT COUNT(*) FROM work_items WHERE state = 'claimed'")[0][0]
    finished = study.query("SELECT COUNT(*) FROM work_items WHERE state = 'done'")[0][0]
    assert finished < study.prompts, "the kill landed before the run ended"

    rerun = study.csr("generate", "--iter", "1", "--quiet", "--lease-seconds", "3")
    assert rerun.returncode == 0, rerun.stderr
    assert study.query("SELECT state, COUNT(*) FROM work_items GROUP BY state") == [("done", study.prompts)]
    trees = _trees(study)
    _assert_complete_trees(study, trees)
    assert sorted(trees.values()) == sorted(_trees(reference).values())
    if claimed:  # the killed worker's claims were taken over after their lease ran out
        assert study.query("SELECT MAX(attempts) FROM work_items")[0][0] >= 2


def _model_dirs(study):
    [(path, clip)] = study.query("SELECT path, clip_model FROM model_versions WHERE version = 0")
    return path, clip.removeprefix("local-dir:")


@pytest.mark.parametrize("workers", [2, 4])
def test_concurrent_workers_share_the_prompts(study, workers):
    processes = [_start_worker(study, "--batch-prompts", "1") for _ in range(workers)]
    outputs = [p.communicate(timeout=600) for p in processes]
    for process, (_out, err) in zip(processes, outputs, strict=True):
        assert process.returncode == 0, err
        assert "database is locked" not in err
    assert study.query("SELECT state, COUNT(*) FROM work_items GROUP BY state") == [("done", study.prompts)]
    per_prompt = study.query(
        "SELECT prompt_id, COUNT(*), COUNT(DISTINCT node) FROM candidates GROUP BY prompt_id"
    )
    assert len(per_prompt) == study.prompts
    assert all(total == distinct for _pid, total, distinct in per_prompt), "no candidate written twice"
    _assert_complete_trees(study, _trees(study))


def test_workers_option_runs_processes(study):
    done = study.invoke("generate", "--iter", "1", "--workers", "2", "--quiet")
    assert done.returncode == 0, done.stderr
    assert study.query("SELECT state, COUNT(*) FROM work_items GROUP BY state") == [("done", study.prompts)]
    assert study.query("SELECT COUNT(DISTINCT pid) FROM workers")[0][0] == 2
