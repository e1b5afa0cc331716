"""Evaluations in the store: CHAIR and POPE per model version on SQLite and
PostgreSQL, reused on rerun, refused whole on bad input; `csr eval` end to end
with a tiny model; `csr eval record`; the benchmark-by-version table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image
from sqlalchemy import insert, select, text
from typer.testing import CliRunner

from csr.cli.app import app
from csr.cli.eval_cmds import parse_versions
from csr.engine.errors import CsrError
from csr.engine.evaluate import pope
from csr.engine.evaluate.benchmarks import ChairTask, PopeTask, evaluate_versions, record_external
from csr.engine.evaluate.chair import world_vocabulary
from csr.storage.clock import utcnow
from csr.storage.models import Evaluation, ModelVersion
from csr.storage.store import Store, create_store
from tests.cli_runner import invoke_csr
from tests.db_backends import fingerprint

NAMES = ["red circle", "blue square", "green cross", "yellow diamond", "white triangle"]
TRUTHS = [frozenset({"red circle", "blue square", "green cross"}),
          frozenset({"blue square", "green cross", "yellow diamond"}),
          frozenset({"red circle"})]
# What each fake model version says about the three images.
SAYS = {
    0: ["There is a red circle. There is a white triangle.",  # white triangle hallucinated
        "There is a blue square. There is a red circle. There is a red circle.",  # red circle twice
        "There is a red circle."],
    1: ["There is a red circle. There is a blue square.",
        "There is a blue square. There is a green cross.",
        "There is a red circle."],
}


def _versions(engine, tmp_path: Path, with_weights=(0, 1), without=(2,)) -> None:
    with engine.begin() as conn:
        for version in (*with_weights, *without):
            path = tmp_path / f"v{version}"
            if version in with_weights:
                path.mkdir()
                (path / "config.json").write_text("{}")
            conn.execute(insert(ModelVersion).values(
                version=version, parent_version=None if version == 0 else version - 1,
                iteration=None if version == 0 else version, path=str(path), base_model="tiny",
                clip_model="tiny-clip", clip_pretrained=None, created_at=utcnow()))


def _tasks(seed: int = 0) -> tuple[ChairTask, PopeTask]:
    images = [Image.new("RGB", (8, 8), (40 * i, 0, 0)) for i in range(3)]
    chair_task = ChairTask(dataset="hand-made", keys=["i0", "i1", "i2"], images=images,
                           prompts=["Describe the image."] * 3, truths=TRUTHS,
                           vocabulary=world_vocabulary(NAMES), max_new_tokens=32, bootstrap_seed=seed)
    questions = [
        pope.Question("random", "i0", "Is there a red circle in the image?", "yes", "red circle"),
        pope.Question("random", "i0", "Is there a white triangle in the image?", "no", "white triangle"),
        pope.Question("random", "i1", "Is there a green cross in the image?", "yes", "green cross"),
        pope.Question("random", "i1", "Is there a red circle in the image?", "no", "red circle"),
    ]
    pope_task = PopeTask(dataset="hand-made", questions=questions, images={}, answer_from="description",
                         describe=chair_task, bootstrap_seed=seed)
    return chair_task, pope_task


class FakeGenerator:
    """Stands in for a model version: fixed descriptions, counted calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []

    def __call__(self, path: str):
        version = int(Path(path).name[1:])

        def generate(images, prompts, max_new_tokens):
            self.calls.append((path, len(images)))
            return list(SAYS[version][: len(images)])

        return generate


def test_chair_and_pope_per_version_equal_a_hand_computation(head_store_url, tmp_path):
    engine, _ = create_store(head_store_url)
    try:
        _versions(engine, tmp_path)
        fake = FakeGenerator()
        chair_task, pope_task = _tasks()
        outcomes = evaluate_versions(Store(engine), [0, 1], [chair_task, pope_task], generator=fake)
        # One load and one batched description pass per version: POPE reuses the descriptions.
        assert [n for _, n in fake.calls] == [3, 3]
        by = {(o.version, o.benchmark): o.metrics for o in outcomes}

        v0 = by[(0, "chair")]
        # mentions: 2 + 3 + 1 = 6; hallucinated: white triangle, red circle x2 = 3
        assert (v0["chair_s"], v0["chair_i"]) == (pytest.approx(2 / 3), pytest.approx(3 / 6))
        assert v0["recall"] == pytest.approx(3 / 7)  # red circle, blue square, red circle of 7 true objects
        assert v0["mean_words"] == pytest.approx((10 + 15 + 5) / 3)
        low, high = v0["ci"]["chair_s"]
        assert 0.0 <= low <= v0["chair_s"] <= high <= 1.0
        assert by[(1, "chair")]["chair_s"] == 0.0 and by[(1, "chair")]["recall"] == pytest.approx(5 / 7)

        # POPE by description: v0 says yes to red circle (i0), white triangle (i0), no to
        # green cross (i1), yes to red circle (i1): TP 1, FP 2, FN 1, TN 0.
        p0 = by[(0, "pope")]["random"]
        assert (p0["tp"], p0["fp"], p0["tn"], p0["fn"]) == (1, 2, 0, 1)
        assert p0["accuracy"] == pytest.approx(1 / 4) and p0["precision"] == pytest.approx(1 / 3)
        assert p0["recall"] == pytest.approx(1 / 2) and p0["f1"] == pytest.approx(2 / 5)
        assert p0["yes_ratio"] == pytest.approx(3 / 4)
        p1 = by[(1, "pope")]["random"]
        assert (p1["accuracy"], p1["f1"], p1["yes_ratio"]) == (1.0, 1.0, 0.5)

        with engine.connect() as conn:
            rows = evaluations(conn, with_items=True)
        assert len(rows) == 4
        chair0 = next(r for r in rows if r["model_version"] == 0 and r["benchmark"] == "chair")
        assert chair0["chair_s"] == pytest.approx(2 / 3) and chair0["n_responses"] == 3
        assert chair0["settings"]["max_new_tokens"] == 32 and chair0["settings"]["dataset"] == "hand-made"
        assert chair0["items"][0] == {"image": "i0", "response": SAYS[0][0],
                                      "mentioned": ["red circle", "white triangle"], "hallucinated": ["white triangle"]}
        assert len(chair0["dataset_hash"]) == 64
        pope0 = next(r for r in rows if r["model_version"] == 0 and r["benchmark"] == "pope")
        assert pope0["chair_s"] is None and len(pope0["items"]) == 4
        assert pope0["items"][1] == {"setting": "random", "image": "i0", "question": "Is there a white triangle in "
                                     "the image?", "label": "no", "answer": "yes", "parsed": "yes"}
    finally:
        engine.dispose()

    # A rerun generates nothing and stores nothing; the results are those stored.
    before = fingerprint(head_store_url)
    engine, _ = create_store(head_store_url)
    try:
        again = FakeGenerator()
        rerun = evaluate_versions(Store(engine), [0, 1], list(_tasks()), generator=again)
    finally:
        engine.dispose()
    assert again.calls == [] and all(o.reused for o in rerun)
    assert [o.metrics for o in rerun] == [o.metrics for o in outcomes]
    assert fingerprint(head_store_url) == before


def test_other_settings_are_another_row_and_intervals_follow_the_seed(sqlite_url, tmp_path):
    engine, _ = create_store(sqlite_url)
    try:
        _versions(engine, tmp_path)
        first = evaluate_versions(Store(engine), [0], [_tasks(seed=0)[0]], generator=FakeGenerator())
        same = evaluate_versions(Store(engine), [0], [_tasks(seed=0)[0]], generator=FakeGenerator())
        other = evaluate_versions(Store(engine), [0], [_tasks(seed=1)[0]], generator=FakeGenerator())
        with engine.connect() as conn:
            assert len(evaluations(conn)) == 2
    finally:
        engine.dispose()
    assert same[0].reused and same[0].metrics == first[0].metrics
    assert not other[0].reused and other[0].metrics["chair_s"] == first[0].metrics["chair_s"]


@pytest.mark.parametrize("versions", [[0, 2], [0, 7]])
def test_a_version_without_weights_stops_everything_before_generation(head_store_url, tmp_path, versions):
    engine, _ = create_store(head_store_url)
    try:
        _versions(engine, tmp_path)
        before = fingerprint(head_store_url)
        fake = FakeGenerator()
        says = "has no weights at" if versions[1] == 2 else "no model version 7"
        with pytest.raises(CsrError, match=says):
            evaluate_versions(Store(engine), versions, list(_tasks()), generator=fake)
        assert fake.calls == [] and fingerprint(head_store_url) == before
    finally:
        engine.dispose()


def test_recorded_metrics(head_store_url, tmp_path):
    engine, _ = create_store(head_store_url)
    try:
        _versions(engine, tmp_path)
        assert record_external(Store(engine), 1, "mme", {"perception": 1510.7, "cognition": 355.7}, "MME", "lmms-eval")
        assert not record_external(Store(engine), 1, "mme", {"perception": 1510.7, "cognition": 355.7}, "MME", "lmms-eval")
        before = fingerprint(head_store_url)
        for args, says in (((1, "mme", {"perception": 1.0}, "MME", "lmms-eval"), "other values"),
                           ((9, "mme", {"perception": 1.0}), "no model version 9"),
                           ((1, "pope", {"f1": 0.8}), "csr eval pope")):
            with pytest.raises(CsrError, match=says):
                record_external(Store(engine), *args)
        assert fingerprint(head_store_url) == before
        with engine.connect() as conn:
            [row] = evaluations(conn)
        assert row["metrics"] == {"perception": 1510.7, "cognition": 355.7} and row["n_responses"] == 0
    finally:
        engine.dispose()


def test_versions_option():
    assert parse_versions("0-3") == [0, 1, 2, 3]
    assert parse_versions("0,2,5-6,2") == [0, 2, 5, 6]
    for bad in ("3-1", "a", "1-", ""):
        with pytest.raises(CsrError, match="--model-versions"):
            parse_versions(bad)


# -- the command line, with a tiny random LLaVA as model version 0 --------------


def _coco(tmp_path: Path) -> tuple[Path, Path]:
    images = tmp_path / "images"
    images.mkdir()
    categories = ["dog", "cat", "car", "bus", "person", "chair", "cup", "bowl"]
    objects = [["dog", "cat", "car"], ["bus", "person", "chair"], ["cup", "bowl", "dog", "person"], ["car"]]
    annotations = []
    for image_id, names in enumerate(objects, start=1):
        Image.new("RGB", (16, 16), (60 * image_id, 30, 200)).save(images / f"{image_id:06d}.png")
        annotations += [{"id": len(annotations) + 1, "image_id": image_id, "category_id": categories.index(n) + 1}
                        for n in names]
    instances = tmp_path / "instances.json"
    instances.write_text(json.dumps({
        "images": [{"id": i, "file_name": f"{i:06d}.png"} for i in range(1, len(objects) + 1)],
        "annotations": annotations,
        "categories": [{"id": i + 1, "name": n} for i, n in enumerate(categories)],
    }))
    return instances, images


def _invoke(url: str, *args):
    return CliRunner().invoke(app, ["--db", url, *map(str, args)])


@pytest.fixture
def tiny_store(head_store_url, tmp_path, tiny_llava_dir):
    engine, _ = create_store(head_store_url)
    try:
        with engine.begin() as conn:
            conn.execute(insert(ModelVersion).values(
                version=0, parent_version=None, iteration=None, path=str(tiny_llava_dir), base_model="tiny",
                clip_model="tiny-clip", clip_pretrained=None, created_at=utcnow()))
            conn.execute(insert(ModelVersion).values(
                version=1, parent_version=0, iteration=1, path=str(tmp_path / "gone"), base_model="tiny",
                clip_model="tiny-clip", clip_pretrained=None, created_at=utcnow()))
    finally:
        engine.dispose()
    return head_store_url


def test_eval_commands_store_once_and_show_in_stats(tiny_store, tmp_path):
    instances, images = _coco(tmp_path)
    pope_args = ("eval", "pope", "--model-versions", "0", "--annotations", instances, "--images", images,
                 "--max-new-tokens", "4", "--seed", "2")
    chair_args = ("eval", "chair", "--model-version", "0", "--annotations", instances, "--images", images,
                  "--max-new-tokens", "6")
    done = _invoke(tiny_store, *pope_args)
    assert done.exit_code == 0, done.output
    assert "model version 0 on POPE adversarial (instances.json): accuracy" in done.output
    done = _invoke(tiny_store, *chair_args)
    assert done.exit_code == 0, done.output
    assert "CHAIR_S" in done.output and "over 4 image(s)" in done.output

    before = fingerprint(tiny_store)
    again = _invoke(tiny_store, *chair_args)
    assert again.exit_code == 0 and "(already stored)" in again.output
    assert _invoke(tiny_store, *pope_args).exit_code == 0
    assert fingerprint(tiny_store) == before

    from sqlalchemy import create_engine
    engine = create_engine(tiny_store.replace("postgresql://", "postgresql+psycopg://", 1))
    try:
        with engine.connect() as conn:
            rows = conn.execute(text("SELECT model_version, benchmark, n_responses, settings FROM evaluations "
                                     "ORDER BY benchmark")).all()
    finally:
        engine.dispose()
    assert [(r.model_version, r.benchmark, r.n_responses) for r in rows] == [(0, "chair", 4), (0, "pope", 3 * 3 * 6)]
    chair_settings = rows[0].settings if isinstance(rows[0].settings, dict) else json.loads(rows[0].settings)
    assert chair_settings["prompt"] == "Please describe this image in detail."
    assert chair_settings["synonyms"] == "coco (shipped)" and chair_settings["max_new_tokens"] == 6

    stats = _invoke(tiny_store, "stats")
    assert stats.exit_code == 0, stats.output
    assert "benchmarks per model version" in stats.output and "random F1" in stats.output


def test_eval_bad_input_is_one_line_and_stores_nothing(tiny_store, tmp_path):
    instances, images = _coco(tmp_path)
    empty = tmp_path / "coco_pope_random.json"
    empty.write_text("")
    malformed = tmp_path / "malformed.json"
    malformed.write_text('{"images": [{"id": 1, "file_name": "000001.png"}]}')
    unknown_image = tmp_path / "unknown.json"
    data = json.loads(instances.read_text())
    data["annotations"].append({"id": 99, "image_id": 42, "category_id": 1})
    unknown_image.write_text(json.dumps(data))
    missing_file = tmp_path / "missing.json"
    data = json.loads(instances.read_text())
    data["images"].append({"id": 5, "file_name": "nowhere.png"})
    missing_file.write_text(json.dumps(data))
    before = fingerprint(tiny_store)
    cases = [
        (("eval", "pope", "--model-version", "0", "--questions", empty, "--images", images), "holds no questions"),
        (("eval", "chair", "--model-version", "0", "--annotations", malformed, "--images", images), "missing"),
        (("eval", "pope", "--model-version", "0", "--annotations", unknown_image, "--images", images), "unknown image 42"),
        (("eval", "chair", "--model-version", "0", "--annotations", missing_file, "--images", images,
          "--all-images"), "nowhere.png"),
        (("eval", "chair", "--model-versions", "0-1", "--annotations", instances, "--images", images),
         "model version 1 has no weights"),
        (("eval", "pope", "--model-version", "0", "--annotations", instances, "--images", images, "--setting", "hard"),
         "unknown POPE setting 'hard'"),
    ]
    for args, says in cases:
        done = _invoke(tiny_store, *args)
        assert done.exit_code != 0, args
        assert isinstance(done.exception, CsrError) and says in str(done.exception), (args, done.exception)
        assert "\n" not in str(done.exception)
    assert fingerprint(tiny_store) == before
    # Through csr's entry point (main, as the console script runs it): one line on stderr.
    shown = invoke_csr("eval", "pope", "--model-version", "0", "--questions", empty, "--images", images, db=tiny_store)
    assert shown.returncode == 1 and shown.stderr.strip().count("\n") == 0
    assert shown.stderr.startswith("csr: error: ") and "holds no questions" in shown.stderr
    assert fingerprint(tiny_store) == before


def test_eval_record_command(tiny_store, tmp_path):
    done = _invoke(tiny_store, "eval", "record", "--model-version", "0", "--benchmark", "mme",
                   "--metric", "perception=1510.7", "--dataset", "MME")
    assert done.exit_code == 0, done.output
    metrics = tmp_path / "m.json"
    metrics.write_text('{"overall": "high"}')
    for args, says in ((("--metric", "perception"), "NAME=NUMBER"), (("--metrics-json", metrics), "name: number"),
                       ((), "no metrics given")):
        bad = _invoke(tiny_store, "eval", "record", "--model-version", "0", "--benchmark", "seed", *args)
        assert bad.exit_code != 0 and says in str(bad.exception)
    stats = _invoke(tiny_store, "stats", "--json")
    summary = json.loads(stats.output)
    assert summary["benchmarks"] == [{"benchmark": "mme", "dataset": "MME", "metric": "perception",
                                      "values": {"0": 1510.7}, "intervals": {}}]


def evaluations(conn, with_items: bool = False) -> list[dict]:
    """Every stored evaluation, by benchmark, version and age; per-item answers when asked for."""
    columns = [c for c in Evaluation.__table__.columns if with_items or c.name != "items"]
    query = select(*columns).order_by(Evaluation.benchmark, Evaluation.model_version, Evaluation.id)
    return [dict(row._mapping) for row in conn.execute(query).all()]
