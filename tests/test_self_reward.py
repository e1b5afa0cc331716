"""The self-rewarding baseline: the judge prompt is the paper's, verdicts are
parsed from the judge's whole output and can be traced back to it, the pairs
are one SQL selection over the judgements, training works on them, and a
killed run is finished by one rerun with the trees a clean run writes."""

from __future__ import annotations

import json
import signal
import subprocess
import tomllib
from itertools import combinations
from pathlib import Path

import pytest
import tomli_w

from csr.engine.errors import SettingsError
from csr.engine.self_reward import (
    JUDGE_PROMPT,
    SelfRewardConfig,
    judge_prompt,
    parse_verdict,
    sample_seed,
)
from tests.cli_runner import invoke_csr
from tests.db_backends import CSR_SCRIPT, only_on
from tests.study import Study, make_study

PAPER = Path("/work/shared/spec/paper-2405.14622.txt")
PROMPTS = 6
# The tests' tiny policy writes only the toy world's words: it cannot answer
# "response 1", so its verdicts are read from two words it does write.
SELF_REWARD = {"samples": 3, "max_new_tokens": 12, "judge_max_new_tokens": 8, "temperature": 1.0,
               "top_p": 1.0, "seed": 7, "judge_answers": ["triangle", "square"]}


# -- the judge, without a model -------------------------------------------------------------


def test_the_judge_prompt_is_table_3_verbatim():
    lines = PAPER.read_text().splitlines() if PAPER.exists() else None
    if lines is None:
        pytest.skip("the paper's text is not on this machine")
    start = next(n for n, line in enumerate(lines) if line.startswith("Table 3: Prompt for self-reward"))
    end = next(n for n, line in enumerate(lines) if line.startswith("Table 4: Prompt for GPT-4"))
    assert "\n".join(lines[start + 1:end]) == JUDGE_PROMPT


@pytest.mark.parametrize("output, expected", [
    ("response 1", (1, None)),
    ("Response 2.", (2, None)),
    ("response1", (1, None)),
    ("2", (2, None)),
    ("I prefer Response 2 because it is shorter", (2, None)),
    ("response 1 or response 2.", (None, "names both responses")),
    ("response 12", (None, "names neither response")),
    ("the first one", (None, "names neither response")),
    ("   ", (None, "empty output")),
])
def test_verdicts_are_parsed_from_the_judge_output(output, expected):
    assert parse_verdict(output) == expected


def test_a_placeholder_inside_a_response_is_not_filled_again():
    shown = judge_prompt(JUDGE_PROMPT, "a {response 2} b", "c")
    assert "Response 1:\na {response 2} b\nResponse 2:\nc\n" in shown


@pytest.mark.parametrize("settings, message", [
    ({"judge_prompt": "which is better? {response 1}"}, "{response 2}"),
    ({"samples": 1}, "samples"),
    ({"top_p": 1.5}, "top_p"),
    ({"judge_answers": ["a", "A"]}, "judge_answers"),
    ({"temprature": 0.5}, "temprature"),
])
def test_bad_self_reward_settings_are_refused(settings, message):
    with pytest.raises(SettingsError, match=message.replace("{", r"\{").replace("}", r"\}")):
        SelfRewardConfig.from_dict(settings)


def test_each_prompt_has_its_own_seed_per_policy_version():
    seeds = {sample_seed(0, v, p) for v in range(3) for p in range(50)}
    assert len(seeds) == 150
    assert sample_seed(0, 1, 5) == sample_seed(0, 1, 5)


# -- end to end ---------------------------------------------------------------------------


def _self_reward_study(directory: Path, url: str, llava_dir: Path, clip_dir: Path) -> Study:
    study = make_study(directory, url, llava_dir, clip_dir, prompts=PROMPTS)
    toml = directory / "csr.toml"
    settings = tomllib.loads(toml.read_text())
    settings["self_reward"] = SELF_REWARD
    toml.write_text(tomli_w.dumps(settings))
    return study


def _trees(study: Study) -> dict[str, list[tuple]]:
    rows = study.query(
        "SELECT p.external_id, c.node, c.text, c.token_ids, c.logprob_sum FROM candidates c "
        "JOIN prompts p ON p.id = c.prompt_id WHERE c.iteration = 1 ORDER BY p.external_id, c.node"
    )
    trees: dict[str, list[tuple]] = {}
    for external_id, node, text, ids, logprob in rows:
        ids = json.loads(ids) if isinstance(ids, str) else ids
        trees.setdefault(external_id, []).append((node, text, ids, round(logprob, 4)))
    return trees


def _judged(study: Study) -> dict[str, list[tuple]]:
    rows = study.query(
        "SELECT p.external_id, j.first_node, j.second_node, j.output, j.verdict FROM judgements j "
        "JOIN prompts p ON p.id = j.prompt_id WHERE j.iteration = 1 ORDER BY p.external_id, j.first_node, "
        "j.second_node"
    )
    judged: dict[str, list[tuple]] = {}
    for external_id, *rest in rows:
        judged.setdefault(external_id, []).append(tuple(rest))
    return judged


def _check_traceable(study: Study) -> None:
    """Every verdict is what its stored output parses to, every judge prompt is the
    template filled with the two stored responses, every reward is a win count."""
    texts = {(p, n): t for p, n, t in study.query("SELECT prompt_id, node, text FROM candidates WHERE iteration = 1")}
    rewards = {(p, n): r for p, n, r in study.query("SELECT prompt_id, node, reward FROM candidates WHERE iteration = 1")}
    judgements = study.query(
        "SELECT prompt_id, first_node, second_node, judge_prompt, output, verdict, parse_error, sample_seed "
        "FROM judgements WHERE iteration = 1"
    )
    prompts = {p for p, _n in texts}
    assert len(prompts) == PROMPTS
    assert len(judgements) == PROMPTS * len(list(combinations(range(SELF_REWARD["samples"]), 2)))
    wins = dict.fromkeys(texts, 0)
    for prompt_id, first, second, shown, output, verdict, why, seed in judgements:
        assert (verdict, why) == parse_verdict(output, SELF_REWARD["judge_answers"])
        assert shown == judge_prompt(JUDGE_PROMPT, texts[(prompt_id, first)], texts[(prompt_id, second)])
        assert seed == sample_seed(SELF_REWARD["seed"], 0, prompt_id)
        if verdict is not None:
            wins[(prompt_id, first if verdict == 1 else second)] += 1
    assert {key: float(n) for key, n in wins.items()} == rewards


def _expected_pairs(study: Study) -> dict[int, tuple[int, int]]:
    """Per prompt (most wins, fewest wins among other texts), ties to the lower candidate id."""
    rows = study.query(
        "SELECT r.prompt_id, r.leaf_candidate_id, r.text, c.reward FROM responses r "
        "JOIN candidates c ON c.id = r.leaf_candidate_id WHERE r.iteration = 1"
    )
    by_prompt: dict[int, list[tuple]] = {}
    for prompt_id, cid, text, reward in rows:
        by_prompt.setdefault(prompt_id, []).append((reward, cid, text))
    expected = {}
    for prompt_id, found in by_prompt.items():
        best = sorted(found, key=lambda r: (-r[0], r[1]))[0]
        others = [r for r in found if r[2] != best[2]]
        if others:
            worst = sorted(others, key=lambda r: (r[0], r[1]))[0]
            if best[0] > worst[0]:
                expected[prompt_id] = (best[1], worst[1])
    return expected


@pytest.mark.slow
def test_self_rewarding_generate_curate_train(tmp_path, store_url, trained_llava_dir, tiny_clip_dir):
    study = _self_reward_study(tmp_path, store_url, trained_llava_dir, tiny_clip_dir)
    done = study.invoke("generate", "--iter", "1", "--method", "self-reward", "--quiet")
    assert done.returncode == 0, done.stderr
    assert study.query("SELECT method, preset, state FROM iterations") == [("self-reward", "self-reward", "generated")]
    config = json.loads(study.invoke("sql", "SELECT config FROM iterations", "--format", "json").stdout)[0]["config"]
    config = json.loads(config) if isinstance(config, str) else config
    assert {k: config["self_reward"][k] for k in SELF_REWARD} == SELF_REWARD
    assert config["self_reward"]["judge_prompt"] == JUDGE_PROMPT

    trees = _trees(study)
    assert all(len(tree) == SELF_REWARD["samples"] for tree in trees.values())
    assert all(ids for tree in trees.values() for _node, _text, ids, _lp in tree), "every sample keeps its ids"
    _check_traceable(study)
    verdicts = [v for tree in _judged(study).values() for *_rest, v in tree]
    assert any(v is not None for v in verdicts), "the tiny judge named an answer at least once"

    # A rerun without --method resumes the iteration as it was started.
    again = study.invoke("generate", "--iter", "1", "--quiet")
    assert again.returncode == 0, again.stderr
    refused = study.invoke("generate", "--iter", "1", "--lambda", "0.5")
    assert refused.returncode == 1 and "--lambda" in refused.stderr

    curated = study.invoke("curate", "--iter", "1")
    assert curated.returncode == 0, curated.stderr
    pairs = study.query("SELECT p.prompt_id, p.chosen_candidate_id, p.rejected_candidate_id, s.source "
                        "FROM pairs p JOIN pair_sets s ON s.id = p.pair_set_id")
    assert {p: (c, r) for p, c, r, _s in pairs} == _expected_pairs(study)
    assert {s for *_ids, s in pairs} == {"self-reward"}
    if not pairs:
        pytest.fail("no prompt got a pair: the test world should give some")

    trained = study.invoke("train", "--iter", "1")
    assert trained.returncode == 0, trained.stderr
    lineage = json.loads(study.invoke("lineage", "--model-version", "1", "--json").stdout)
    assert lineage[0]["generation"]["method"] == "self-reward"
    assert lineage[0]["pair_set"]["source"] == "self-reward"
    shown = study.invoke("lineage", "--model-version", "1")
    assert "self-rewarding" in shown.stdout

    # Iteration 2 samples from version 1 and keeps the method given.
    second = study.invoke("iterate", "--iter", "2", "--method", "self-reward", "--quiet")
    assert second.returncode == 0, second.stderr
    assert study.query("SELECT number, method FROM iterations ORDER BY number") == [
        (1, "self-reward"), (2, "self-reward")]
    assert study.query("SELECT MAX(version) FROM model_versions") == [(2,)]


def _states(study: Study) -> dict[str, int]:
    return dict(study.query("SELECT state, COUNT(*) FROM work_items WHERE iteration = 1 GROUP BY state"))


@pytest.mark.slow
@pytest.mark.parametrize("backend", only_on("sqlite"))
def test_a_killed_self_rewarding_run_is_finished_by_one_rerun(tmp_path, store_url, trained_llava_dir,
                                                               tiny_clip_dir):
    import os
    import time

    clean = _self_reward_study(tmp_path / "clean", f"sqlite:///{tmp_path / 'clean' / 'store.db'}",
                               trained_llava_dir, tiny_clip_dir)
    done = clean.csr("generate", "--iter", "1", "--method", "self-reward", "--quiet")
    assert done.returncode == 0, done.stderr

    (tmp_path / "killed").mkdir()
    study = _self_reward_study(tmp_path / "killed", store_url, trained_llava_dir, tiny_clip_dir)
    env = {k: v for k, v in os.environ.items() if k != "CSR_DATABASE_URL"}
    worker = subprocess.Popen(
        [str(CSR_SCRIPT), "--db", study.url, "generate", "--iter", "1", "--method", "self-reward", "--quiet",
         "--batch-prompts", "2", "--lease-seconds", "600"],
        cwd=study.directory, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    deadline = time.monotonic() + 240
    while True:
        states = _states(study)
        if states.get("done", 0) >= 1 and states.get("claimed", 0) >= 1:
            break
        if worker.poll() is not None:
            pytest.fail(f"the worker ended before a kill could leave work behind: {worker.communicate()[1]}")
        if time.monotonic() > deadline:
            pytest.fail("timed out waiting for a prompt done and others claimed")
        time.sleep(0.02)
    worker.send_signal(signal.SIGKILL)
    worker.communicate()
    assert _states(study).get("claimed", 0) >= 1, "the dead worker left claims behind"

    rerun = study.csr("generate", "--iter", "1", "--quiet", "--lease-seconds", "600", timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert _states(study) == {"done": PROMPTS}
    assert study.query("SELECT COUNT(*) FROM (SELECT prompt_id, node FROM candidates "
                       "GROUP BY prompt_id, node HAVING COUNT(*) > 1) d") == [(0,)]
    # The same samples and the same verdicts as the run nothing interrupted.
    assert _trees(study) == _trees(clean)
    assert _judged(study) == _judged(clean)
    _check_traceable(study)


@pytest.mark.slow
def test_the_demo_runs_the_self_rewarding_baseline(tmp_path):
    results = tmp_path / "results.json"
    done = invoke_csr("demo", "--dir", tmp_path / "study", "--method", "self-reward", "--quick", "--prompts", "6",
                      "--heldout", "12", "--model-scenes", "300", "--iter", "1-1", "--seed", "3", "--out", results)
    assert done.returncode == 0, done.stderr
    assert json.loads(results.read_text())["method"] == "self-reward"
    study = Study(tmp_path / "study", f"sqlite:///{tmp_path / 'study' / 'csr.db'}", 6)
    assert study.query("SELECT number, method FROM iterations") == [(1, "self-reward")]
    assert study.query("SELECT COUNT(*) FROM judgements") == [(6,)]
    assert study.query("SELECT MAX(version) FROM model_versions") == [(1,)]
