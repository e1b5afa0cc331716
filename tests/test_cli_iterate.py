"""`csr iterate` takes the options of the steps it runs: a subset (--limit),
--allow-partial, a named --pair-set, --force, --json; and a normal run does
not read as a problem."""

from __future__ import annotations

import json

import pytest

from tests.study import make_study

# Generation and training in process: the full suite (make test), not the fast lane.
pytestmark = pytest.mark.slow


def test_iterate_with_the_options_of_its_steps(tmp_path, trained_llava_dir, tiny_clip_dir):
    study = make_study(tmp_path, f"sqlite:///{tmp_path / 'store.db'}", trained_llava_dir, tiny_clip_dir, prompts=4)
    partial = study.invoke("iterate", "--iter", "1", "--limit", "1", "--quiet", "--device", "cpu", "--dtype", "fp32")
    assert partial.returncode == 1 and "--allow-partial" in partial.stderr, partial.stderr

    # one prompt more (a --limit counts the prompts of this run), then training on the two
    done = study.invoke("iterate", "--iter", "1", "--limit", "1", "--allow-partial", "--pair-set", "mine",
                        "--quiet", "--device", "cpu", "--dtype", "fp32", "--json")
    assert done.returncode == 0, done.stderr
    [result] = json.loads(done.stdout)
    assert result["curated"]["pair_set"] == "mine" and result["trained"]["model_version"] == 1
    assert study.query("SELECT COUNT(DISTINCT prompt_id) FROM candidates WHERE iteration = 1") == [(2,)]
    assert json.loads(study.query("SELECT config FROM iterations WHERE number = 1")[0][0])["dtype"] == "float32"
    assert study.query("SELECT s.name FROM training_runs r JOIN pair_sets s ON s.id = r.pair_set_id") == [("mine",)]

    kept = study.invoke("iterate", "--iter", "1", "--pair-set", "mine", "--quiet", "--device", "cpu")
    assert kept.returncode == 0 and "exists, skipping (--force trains it again)" in kept.stdout, kept.stderr
    # the rest of the prompts is generated now: pair set 'mine' would select other pairs
    forced = study.invoke("iterate", "--iter", "1", "--pair-set", "all", "--force", "--allow-partial", "--dtype", "float32",
                          "--quiet", "--device", "cpu", "--json")
    assert forced.returncode == 0, forced.stderr
    assert json.loads(forced.stdout)[0]["trained"]["model_version"] == 1
    assert study.query("SELECT s.name FROM training_runs r JOIN pair_sets s ON s.id = r.pair_set_id "
                       "ORDER BY r.id") == [("mine",), ("all",)]
    assert "held by other workers" not in forced.stderr
