"""curate, train, export, lineage: pairs recomputed independently in Python,
order rules, reproducible training, provenance."""

from __future__ import annotations

import json
import math
import shutil

import pytest

from csr.engine.train.lora import weights_hash
from tests.db_backends import fingerprint
from tests.study import Study, make_study

# End to end (generation and training runs, in process): the full suite (make test), not the
# fast lane (make check).
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def generated_template(tmp_path_factory, trained_llava_dir, tiny_clip_dir):
    directory = tmp_path_factory.mktemp("generated")
    study = make_study(directory, f"sqlite:///{directory / 'store.db'}", trained_llava_dir, tiny_clip_dir)
    done = study.invoke("generate", "--iter", "1", "--quiet")
    assert done.returncode == 0, done.stderr
    return study


@pytest.fixture
def generated(tmp_path, generated_template) -> Study:
    """A fresh copy of a study whose iteration 1 is generated."""
    target = tmp_path / "study"
    shutil.copytree(generated_template.directory, target)
    return Study(target, f"sqlite:///{target / 'store.db'}", generated_template.prompts)


def _responses(study: Study, lam: float) -> dict[int, list[tuple[float, int, str]]]:
    """Every final response's paper-preset score, recomputed here from raw candidate scores."""
    rows = study.query(
        "SELECT id, prompt_id, node, parent_node, text, r_t, r_i, is_final, exclusion_reason "
        "FROM candidates WHERE iteration = 1"
    )
    by_node = {(r[1], r[2]): r for r in rows}
    responses: dict[int, list[tuple[float, int, str]]] = {}
    for cid, prompt_id, _node, parent, text, r_t, r_i, final, excluded in rows:
        if not final or excluded:
            continue
        score, words, current = 0.0, [], (cid, prompt_id, _node, parent, text, r_t, r_i)
        while True:
            if current[4].strip():
                score += lam * current[6] + (1 - lam) * current[5]
                words.insert(0, current[4].strip())
            if current[3] is None:
                break
            current = by_node[(prompt_id, current[3])]
        responses.setdefault(prompt_id, []).append((score, cid, " ".join(words)))
    return responses


def _expected_pairs(study: Study, lam: float) -> dict[int, tuple[int, int]]:
    expected = {}
    for prompt_id, found in _responses(study, lam).items():
        best = sorted(found, key=lambda r: (-r[0], r[1]))[0]
        others = [r for r in found if r[2] != best[2]]
        if others:
            worst = sorted(others, key=lambda r: (r[0], r[1]))[0]
            expected[prompt_id] = (best[1], worst[1])
    return expected


def _pair_set(study: Study, name: str) -> dict[int, tuple[int, int]]:
    rows = study.query(
        "SELECT p.prompt_id, p.chosen_candidate_id, p.rejected_candidate_id, p.chosen_reward, p.rejected_reward "
        "FROM pairs p JOIN pair_sets s ON s.id = p.pair_set_id WHERE s.name = :name",
        name=name,
    )
    assert all(chosen >= rejected for *_ids, chosen, rejected in rows)
    return {r[0]: (r[1], r[2]) for r in rows}


def test_curate_selects_best_and_worst_responses_by_sql(generated):
    done = generated.invoke("curate", "--iter", "1")
    assert done.returncode == 0, done.stderr
    assert "(default) created" in done.stdout
    default = _pair_set(generated, "paper-lambda0.9-margin0")
    assert default == _expected_pairs(generated, 0.9)
    assert len(default) >= generated.prompts - 1, "nearly every prompt has two distinct responses"

    # The search's own cumulative reward and the SQL agree on the best response.
    for prompt_id, (chosen, _rejected) in default.items():
        finals = generated.query(
            "SELECT id, cumulative_reward FROM candidates WHERE prompt_id = :p AND is_final "
            "AND exclusion_reason IS NULL ORDER BY cumulative_reward DESC, id",
            p=prompt_id,
        )
        assert finals[0][0] == chosen

    [(first_hash,)] = generated.query("SELECT result_hash FROM pair_sets")
    again = generated.invoke("curate", "--iter", "1")
    assert again.returncode == 0 and "unchanged" in again.stdout
    assert generated.query("SELECT result_hash FROM pair_sets") == [(first_hash,)]

    for lam in ("0", "1"):
        assert generated.invoke("curate", "--iter", "1", "--lambda", lam).returncode == 0
        assert _pair_set(generated, f"paper-lambda{lam}-margin0") == _expected_pairs(generated, float(lam))
    # R_T alone and R_I alone disagree somewhere, so the ablations select other pairs.
    assert _pair_set(generated, "paper-lambda0-margin0") != _pair_set(generated, "paper-lambda1-margin0")
    assert generated.query("SELECT name FROM pair_sets WHERE is_default") == [("paper-lambda0.9-margin0",)]
    # Re-curation never touches the candidates.
    assert generated.query("SELECT COUNT(*) FROM candidates WHERE iteration = 1")[0][0] > 0


def test_train_order_rules_change_nothing(tmp_path, trained_llava_dir, tiny_clip_dir):
    study = make_study(tmp_path, f"sqlite:///{tmp_path / 'store.db'}", trained_llava_dir, tiny_clip_dir)
    before = fingerprint(study.url)
    not_generated = study.invoke("train", "--iter", "1")
    assert not_generated.returncode != 0 and "csr generate --iter 1" in not_generated.stderr
    assert fingerprint(study.url) == before

    assert study.invoke("generate", "--iter", "1", "--limit", "2", "--quiet").returncode == 0
    before = fingerprint(study.url)
    partial = study.invoke("train", "--iter", "1")
    assert partial.returncode != 0 and "--allow-partial" in partial.stderr
    assert "Traceback" not in partial.stderr
    assert fingerprint(study.url) == before

    empty = study.invoke("curate", "--iter", "1", "--min-margin", "1e9", "--pair-set", "none", "--default")
    assert empty.returncode == 0 and "0 pair(s)" in empty.stdout
    before = fingerprint(study.url)
    refused = study.invoke("train", "--iter", "1", "--allow-partial")
    assert refused.returncode != 0 and "empty" in refused.stderr
    assert fingerprint(study.url) == before


def test_train_registers_a_reproducible_version_and_its_lineage(generated, trained_llava_dir):
    done = generated.invoke("train", "--iter", "1", "--device", "cpu")
    assert done.returncode == 0, done.stderr
    [(path, parent, digest, iteration)] = generated.query(
        "SELECT path, parent_version, weights_hash, iteration FROM model_versions WHERE version = 1"
    )
    assert (parent, iteration) == (0, 1)
    assert digest == weights_hash(path) != weights_hash(trained_llava_dir)
    [(sql, pairs_hash, state, hyper)] = generated.query(
        "SELECT selection_sql, pairs_hash, state, hyperparams FROM training_runs"
    )
    assert state == "done" and "FROM pairs" in sql and len(pairs_hash) == 64
    assert json.loads(hyper)["learning_rate"] == pytest.approx(1e-3)

    refused = generated.invoke("train", "--iter", "1")
    assert refused.returncode != 0 and "--force" in refused.stderr
    forced = generated.invoke("train", "--iter", "1", "--force", "--device", "cpu")
    assert forced.returncode == 0, forced.stderr
    [(digest_again,)] = generated.query("SELECT weights_hash FROM model_versions WHERE version = 1")
    assert digest_again == digest, "same store, same seed: same weights on CPU"

    lineage = generated.invoke("lineage", "--model-version", "1", "--json")
    assert lineage.returncode == 0, lineage.stderr
    chain = json.loads(lineage.stdout)
    assert [entry["version"] for entry in chain] == [1, 0]
    assert chain[0]["pair_set"]["name"] == "paper-lambda0.9-margin0"
    assert chain[0]["training_run"]["pairs_hash"] == pairs_hash
    assert chain[0]["generation"]["config"]["search"]["num_beams"] == 2
    text = generated.invoke("lineage", "--model-version", "1").stdout
    assert "{" not in text and "base model, not" not in text and "SELECT" not in text, text
    assert f"reference log-probs: {chain[0]['metrics']['reference']}" in text
    assert "SELECT" in generated.invoke("lineage", "--model-version", "1", "--sql").stdout

    # The new version is the policy of the next iteration, loaded the usual way.
    nxt = generated.invoke("generate", "--iter", "2", "--limit", "2", "--quiet")
    assert nxt.returncode == 0, nxt.stderr
    assert generated.query("SELECT policy_version FROM iterations WHERE number = 2") == [(1,)]
    assert generated.query("SELECT COUNT(DISTINCT prompt_id) FROM candidates WHERE iteration = 2") == [(2,)]
    blocked = generated.invoke("train", "--iter", "1", "--force")
    assert blocked.returncode != 0 and "iteration 2 was generated from it" in blocked.stderr


def test_export_formats(generated):
    assert generated.invoke("curate", "--iter", "1").returncode == 0
    pairs = generated.query("SELECT COUNT(*) FROM pairs")[0][0]
    out = generated.directory / "out"
    for fmt, name in (("llava-json", "p.json"), ("trl-jsonl", "p.jsonl"), ("parquet", "p.parquet")):
        done = generated.invoke("export", "--iter", "1", "--format", fmt, "--out", out / name)
        assert done.returncode == 0, done.stderr
    llava = json.loads((out / "p.json").read_text())
    assert len(llava) == pairs
    first = llava[0]
    assert first["conversations"][0] == first["rejected_conversations"][0]
    assert first["conversations"][0]["value"].startswith("<image>\n")
    assert first["conversations"][1]["value"] != first["rejected_conversations"][1]["value"]
    trl = [json.loads(line) for line in (out / "p.jsonl").read_text().splitlines()]
    assert len(trl) == pairs and set(trl[0]) >= {"images", "prompt", "chosen", "rejected"}
    import pyarrow.parquet as pq

    table = pq.read_table(out / "p.parquet").to_pylist()
    assert len(table) == pairs
    for row in table:
        assert row["margin"] == pytest.approx(row["chosen_reward"] - row["rejected_reward"])
        assert math.isfinite(row["chosen_r_i_sum"]) and row["chosen_sentences"] >= 1
    bad = generated.invoke("export", "--iter", "1", "--format", "csv")
    assert bad.returncode != 0 and "Invalid value for '--format': 'csv' is not one of" in bad.stderr


def test_curation_is_identical_on_sqlite_and_postgresql(tmp_path, postgres_url, trained_llava_dir, tiny_clip_dir):
    hashes = []
    for name, url in (("lite", f"sqlite:///{tmp_path / 'lite.db'}"), ("pg", postgres_url)):
        study = make_study(tmp_path / name, url, trained_llava_dir, tiny_clip_dir, prompts=3)
        assert study.invoke("generate", "--iter", "1", "--quiet").returncode == 0
        for preset in ("paper", "reference-code"):
            done = study.invoke("curate", "--iter", "1", "--preset", preset)
            assert done.returncode == 0, done.stderr
        hashes.append(study.query("SELECT name, result_hash FROM pair_sets ORDER BY name"))
    assert hashes[0] == hashes[1]


def _set_train_option(study: Study, key: str, value) -> None:
    toml = study.directory / "csr.toml"
    toml.write_text(toml.read_text().replace("[train]\n", f"[train]\n{key} = {json.dumps(value)}\n"))


def test_over_long_responses_are_counted_and_refused_never_cut(generated):
    assert generated.invoke("curate", "--iter", "1").returncode == 0
    lengths = generated.query(
        "SELECT rc.token_count, rr.token_count FROM pairs p "
        "JOIN responses rc ON rc.leaf_candidate_id = p.chosen_candidate_id "
        "JOIN responses rr ON rr.leaf_candidate_id = p.rejected_candidate_id"
    )
    limit = min(max(pair) for pair in lengths) - 1  # no pair fits
    _set_train_option(generated, "max_response_tokens", limit)

    stats = generated.invoke("stats", "--json")
    assert stats.returncode == 0, stats.stderr
    [it] = json.loads(stats.stdout)["iterations"]
    assert (it["pairs_over_training_limit"], it["max_response_tokens"]) == (len(lengths), limit)

    before = fingerprint(generated.url)
    skipped_all = generated.invoke("train", "--iter", "1", "--device", "cpu")
    assert skipped_all.returncode != 0 and "nothing to train on" in skipped_all.stderr
    _set_train_option(generated, "too_long", "refuse")
    refused = generated.invoke("train", "--iter", "1", "--device", "cpu")
    assert refused.returncode != 0, refused.stdout
    assert f"{len(lengths)} pair(s)" in refused.stderr and "max_response_tokens" in refused.stderr
    for done in (skipped_all, refused):
        assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert fingerprint(generated.url) == before


def test_training_leaves_out_only_the_pairs_that_do_not_fit():
    from csr.engine.iterations import split_too_long

    rows = [{"chosen_token_count": c, "rejected_token_count": r} for c, r in ((10, 12), (30, 5), (8, 8), (5, 31))]
    fits, too_long = split_too_long(rows, 30)
    assert fits == rows[:3] and too_long == rows[3:]


def test_recuration_under_another_lambda_says_so(generated):
    same = generated.invoke("curate", "--iter", "1")
    assert same.returncode == 0 and "re-curated" not in same.stdout
    other = generated.invoke("curate", "--iter", "1", "--lambda", "0.5")
    assert other.returncode == 0, other.stderr
    assert "re-curated, not regenerated" in other.stdout and "lambda 0.9" in other.stdout
    [(params,)] = generated.query("SELECT params FROM pair_sets WHERE name = 'paper-lambda0.5-margin0'")
    params = json.loads(params)
    assert params["recurated"] is True and params["grown_under"] == {"preset": "paper", "lambda": 0.9}
