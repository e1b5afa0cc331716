"""End to end: a reduced `csr demo` (quick models, a few prompts, 2 iterations)
through the real console script, then in process its resume and `csr eval
chair` on COCO-style annotations of the demo world's images."""

import json

import pytest
from sqlalchemy import create_engine, text

from csr.engine.demo.world import WorldConfig, generate_scenes, render
from tests.cli_runner import invoke_csr
from tests.db_backends import fingerprint, run_csr

pytestmark = pytest.mark.slow

ITERATIONS = 2
DEMO_ARGS = ("--quick", "--prompts", "6", "--heldout", "12", "--model-scenes", "300",
             "--iter", f"1-{ITERATIONS}", "--seed", "3")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    study, results = root / "study", root / "results.json"
    done = run_csr("demo", "--dir", study, *DEMO_ARGS, "--out", results, timeout=900)
    assert done.returncode == 0, done.stderr
    return study, json.loads(results.read_text()), done.stdout


def _query(study, sql: str) -> list[tuple]:
    engine = create_engine(f"sqlite:///{study / 'csr.db'}")
    try:
        with engine.connect() as conn:
            return [tuple(row) for row in conn.execute(text(sql))]
    finally:
        engine.dispose()


def test_demo_runs_every_iteration_and_reports_chair_per_version(demo):
    study, results, stdout = demo
    versions = results["versions"]
    assert [v["version"] for v in versions] == list(range(ITERATIONS + 1))
    for v in versions:
        assert 0.0 <= v["chair_s"] <= 1.0 and 0.0 <= v["chair_i"] <= 1.0
        assert v["mean_words"] > 0
    for v in versions[1:]:
        assert v["pairs"] > 0
        assert v["chosen_r_i"] is not None and v["rejected_r_i"] is not None
    assert "wall time:" in stdout and "CHAIR_S" in stdout and "POPE F1" in stdout
    for v in versions:  # CHAIR and POPE F1 with their 95 % intervals
        assert v["chair_s_ci"][0] <= v["chair_s"] <= v["chair_s_ci"][1]
        for setting in ("random", "popular", "adversarial"):
            low, high = v["pope"][setting]["f1_ci"]
            assert low <= v["pope"][setting]["f1"] <= high

    # Everything went through the store: every prompt done in each iteration,
    # a model version per iteration, and the CHAIR printed is the CHAIR stored.
    assert _query(study, "SELECT iteration, state, count(*) FROM work_items GROUP BY iteration, state "
                         "ORDER BY iteration") == [(n, "done", 6) for n in range(1, ITERATIONS + 1)]
    assert _query(study, "SELECT version, parent_version FROM model_versions ORDER BY version") == [
        (0, None), *((n, n - 1) for n in range(1, ITERATIONS + 1))
    ]
    stored = _query(study, "SELECT model_version, chair_s, chair_i FROM evaluations WHERE benchmark = 'chair' "
                           "ORDER BY model_version")
    assert stored == [(v["version"], pytest.approx(v["chair_s"]), pytest.approx(v["chair_i"])) for v in versions]

    stats = invoke_csr("stats", db=f"sqlite:///{study / 'csr.db'}")
    assert stats.returncode == 0, stats.stderr
    assert "demo-world-heldout" in stats.stdout and "CHAIR_S" in stats.stdout


def test_demo_refuses_an_unknown_preset_before_writing_anything(tmp_path):
    bad = invoke_csr("demo", "--dir", tmp_path / "study", *DEMO_ARGS, "--preset", "paper-ish")
    assert bad.returncode != 0
    assert bad.stderr.strip() == (
        "csr: error: Invalid value for '--preset': 'paper-ish' is not one of 'paper', 'reference-code'."
    )
    assert not (tmp_path / "study").exists()


def test_demo_resumes_in_its_directory_without_training_again(demo):
    study, results, _ = demo
    hashes = _query(study, "SELECT version, weights_hash FROM model_versions ORDER BY version")
    again = invoke_csr("demo", "--dir", study, *DEMO_ARGS)
    assert again.returncode == 0, again.stderr
    assert f"model version {ITERATIONS} exists, kept" in again.stdout
    assert _query(study, "SELECT version, weights_hash FROM model_versions ORDER BY version") == hashes

    before = fingerprint(f"sqlite:///{study / 'csr.db'}"), (study / "csr.toml").read_text()
    other = invoke_csr("demo", "--dir", study, *DEMO_ARGS, "--lambda", "0.5")
    assert other.returncode != 0
    assert "pass another --dir" in other.stderr and "lam" in other.stderr
    assert len(other.stderr.strip().splitlines()) == 1
    assert (fingerprint(f"sqlite:///{study / 'csr.db'}"), (study / "csr.toml").read_text()) == before


def _coco_files(tmp_path, scenes):
    images = tmp_path / "images"
    images.mkdir()
    names = sorted({o for s in scenes for o in s.truth})
    category = {name: i + 1 for i, name in enumerate(names)}
    annotations = []
    for image_id, scene in enumerate(scenes, start=1):
        render(scene).save(images / f"{image_id:06d}.png")
        annotations += [{"id": len(annotations) + 1, "image_id": image_id, "category_id": category[o]}
                        for o in sorted(scene.truth)]
    instances = tmp_path / "instances.json"
    instances.write_text(json.dumps({
        "images": [{"id": i, "file_name": f"{i:06d}.png"} for i in range(1, len(scenes) + 1)],
        "annotations": annotations,
        "categories": [{"id": i, "name": n} for n, i in category.items()],
    }))
    synonyms = tmp_path / "synonyms.txt"
    synonyms.write_text("# category, synonyms\n" + "\n".join(names) + "\n")
    return instances, synonyms, images


def test_eval_chair_on_coco_style_annotations(demo, tmp_path):
    study, _, _ = demo
    url = f"sqlite:///{study / 'csr.db'}"
    scenes = generate_scenes(WorldConfig(seed=3), 5, "heldout", start=500)
    instances, synonyms, images = _coco_files(tmp_path, scenes)
    done = invoke_csr("eval", "chair", "--model-version", str(ITERATIONS), "--annotations", instances,
                      "--synonyms", synonyms, "--images", images, "--prompt", "Describe the image.", db=url)
    assert done.returncode == 0, done.stderr
    assert "CHAIR_S" in done.stdout and "over 5 image(s)" in done.stdout
    [(version, n, chair_s)] = _query(study, "SELECT model_version, n_responses, chair_s FROM evaluations "
                                            "WHERE benchmark = 'chair' AND n_responses = 5")
    assert (version, n) == (ITERATIONS, 5) and 0.0 <= chair_s <= 1.0

    before = fingerprint(url)
    missing = invoke_csr("eval", "chair", "--model-version", "9", "--annotations", instances,
                         "--synonyms", synonyms, "--images", images, db=url)
    bad_synonyms = tmp_path / "bad.txt"
    bad_synonyms.write_text("unicorn, horse with a horn\n")
    unknown = invoke_csr("eval", "chair", "--model-version", "0", "--annotations", instances,
                         "--synonyms", bad_synonyms, "--images", images, db=url)
    escaping = tmp_path / "escaping.json"
    data = json.loads(instances.read_text())
    data["images"][0]["file_name"] = "../instances.json"
    escaping.write_text(json.dumps(data))
    escape = invoke_csr("eval", "chair", "--model-version", "0", "--annotations", escaping,
                        "--synonyms", synonyms, "--images", images, db=url)
    for failed, says in ((missing, "no model version 9"), (unknown, "unicorn"),
                         (escape, "escapes the images directory")):
        assert failed.returncode != 0
        assert says in failed.stderr and len(failed.stderr.strip().splitlines()) == 1
    assert fingerprint(url) == before


def test_truth_pairs_swap_one_object_for_one_the_scene_does_not_hold(tmp_path):
    import random

    from csr.engine.demo.truth_pairs import hallucinated_caption, write_truth_pairs
    from csr.engine.demo.world import caption

    scenes = generate_scenes(WorldConfig(seed=5), 40, "train")
    rng = random.Random(0)
    for scene in scenes:
        chosen, rejected = caption(scene).split(". "), hallucinated_caption(scene, rng).split(". ")
        assert len(chosen) == len(rejected)
        changed = [(c, r) for c, r in zip(chosen, rejected, strict=True) if c != r]
        assert len(changed) == 1
        named = changed[0][1].removesuffix(".").split()[-2:]
        assert " ".join(named) not in scene.truth
    path = write_truth_pairs(scenes, tmp_path / "pairs.jsonl", seed=1)
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["id"] for r in records] == [s.id for s in scenes]
    assert all(r["image"] == f"{r['id']}.png" and r["chosen"] != r["rejected"] for r in records)


def test_demo_trains_on_imported_truth_pairs(tmp_path):
    """--method truth-pairs: each iteration imports pairs made from the ground
    truth (as `csr pairs import` does) and trains on them; lineage names them."""
    study = tmp_path / "truth"
    args = ("--quick", "--prompts", "6", "--heldout", "6", "--model-scenes", "300", "--iter", "1-2", "--seed", "3")
    done = invoke_csr("demo", "--dir", study, *args, "--method", "truth-pairs", "--out", tmp_path / "r.json")
    assert done.returncode == 0, done.stderr
    versions = json.loads((tmp_path / "r.json").read_text())["versions"]
    assert [(v["version"], v["pairs"]) for v in versions] == [(0, None), (1, 6), (2, 6)]
    assert _query(study, "SELECT number, method FROM iterations ORDER BY number") == [(1, "outside"), (2, "outside")]
    assert _query(study, "SELECT count(*) FROM work_items") == [(0,)]  # nothing generated
    assert _query(study, "SELECT version, parent_version FROM model_versions ORDER BY version") == [
        (0, None), (1, 0), (2, 1)]
    lineage = invoke_csr("lineage", "--model-version", "2", db=f"sqlite:///{study / 'csr.db'}")
    assert lineage.returncode == 0, lineage.stderr
    assert "truth-1" in lineage.stdout and "truth-2" in lineage.stdout

    again = invoke_csr("demo", "--dir", study, *args, "--method", "truth-pairs")  # resumes: nothing trained again
    assert again.returncode == 0, again.stderr
    assert "model version 2 exists, kept" in again.stdout


def test_a_method_with_no_pairs_stops_the_demo_and_keeps_the_version_it_had(tmp_path):
    """Self-rewarding whose judge never names a response makes no pair: the demo
    says so, stops at that iteration and reports the versions it has, instead of
    failing the run (a comparison then keeps that method's last version)."""
    from csr.engine.demo.run import DemoMethod, DemoOptions, run_demo

    lines = []
    options = DemoOptions(directory=tmp_path / "study", iterations=2, prompts=4, heldout=6, seed=3, size="quick",
                          model_scenes=300, method=DemoMethod.self_reward,
                          self_reward={"judge_answers": ["qqqq zzzz", "wwww xxxx"]})
    report = run_demo(options, say=lines.append)
    assert report.empty_iteration == 1
    assert [row.version for row in report.rows] == [0]
    assert any(line.startswith("iteration 1: no pairs, nothing to train on") for line in lines)
    study = tmp_path / "study"
    assert _query(study, "SELECT version FROM model_versions") == [(0,)]
    assert _query(study, "SELECT count(*) FROM pairs") == [(0,)]
    assert _query(study, "SELECT count(*) FROM work_items WHERE state = 'done'") == [(4,)]
