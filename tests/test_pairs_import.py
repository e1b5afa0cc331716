"""`csr pairs import`: the published layouts read into one pair set, bad files
refused whole (the store compared row by row), re-imports idempotent, and
training on an imported pair set with its reference computed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.cli_runner import invoke_csr
from tests.db_backends import table_rows
from tests.study import make_study
from tests.worlds import PROMPT, colour_image


def _ratings(helpful: str, faithful: str, ethical: str) -> dict:
    return {"Helpfulness": {"Rating": helpful, "Rationale": "..."},
            "Visual Faithfulness": {"Rating": faithful, "Rationale": "..."},
            "Ethical Considerations": {"Rating": ethical, "Rationale": "..."}}


# One record of each layout, as published (and the expected prompt, chosen, rejected, id).
RECORDS = [
    ({"id": "t1", "prompt": "Describe the image.", "chosen": "there is a red square.",
      "rejected": "there is a blue square.", "images": ["red.png"]},
     ("Describe the image.", "there is a red square.", "there is a blue square.", "t1", "trl")),
    ({"prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}],
      "chosen": [{"role": "assistant", "content": [{"type": "text", "text": "a green circle."}]}],
      "rejected": [{"role": "assistant", "content": [{"type": "text", "text": "a red circle."}]}],
      "image": "green.png"},
     ("What is it?", "a green circle.", "a red circle.", None, "trl")),
    ({"id": "l1", "image": "blue.png",
      "conversations": [{"from": "human", "value": "<image>\nDescribe the image."},
                        {"from": "gpt", "value": "there is a blue square."}],
      "chosen": "there is a blue square.", "rejected": "there is a yellow square."},
     ("Describe the image.", "there is a blue square.", "there is a yellow square.", "l1", "llava")),
    ({"id": "rlhf-human-7", "image": "yellow.png",
      "conversations": [{"from": "human", "value": "What colour is the shape?\n<image>"}],
      "output_1": {"from": "llava", "value": "It is red."}, "output_2": {"from": "llava", "value": "It is yellow."},
      "preference": 2},
     ("What colour is the shape?", "It is yellow.", "It is red.", "rlhf-human-7", "llava")),
    ({"ds_name": "RLHF-V-Hall_v0", "text": json.dumps({"question": "<image>\nDescribe it in detail.",
                                                       "chosen": "a red square on white.",
                                                       "rejected": "a red square and a dog."}),
      "origin_dataset": "VQAv2", "origin_split": "...", "idx": 0, "image_path": "red.png"},
     ("Describe it in detail.", "a red square on white.", "a red square and a dog.", "0", "rlhf-v")),
    ({"ds_name": "RLAIF-V", "question": "Is there a circle?", "chosen": "Yes.", "rejected": "No, a square.",
      "idx": "a-3", "image_path": "green.png"},
     ("Is there a circle?", "Yes.", "No, a square.", "a-3", "rlhf-v")),
    ({"id": "vlf-1", "prompt": "Describe the picture.", "models": ["m1", "m2", "m3"], "img_path": "blue.png",
      "completions": [
          {"annotations": _ratings("3", "3", "5"), "model": "m1", "response": "a blue square."},
          {"annotations": _ratings("5", "5", "5"), "model": "m2", "response": "a big blue square."},
          {"annotations": _ratings("2", "1", "5"), "model": "m3", "response": "a blue cat."}]},
     ("Describe the picture.", "a big blue square.", "a blue cat.", "vlf-1", "vlfeedback")),
]
TIED = {"id": "vlf-2", "prompt": "Describe.", "models": ["m1", "m2"], "img_path": "red.png",
        "completions": [{"annotations": _ratings("4", "4", "4"), "model": "m1", "response": "red."},
                        {"annotations": _ratings("4", "4", "4"), "model": "m2", "response": "a red one."}]}


@pytest.fixture
def images(tmp_path: Path) -> Path:
    directory = tmp_path / "images"
    directory.mkdir()
    for colour in ("red", "green", "blue", "yellow"):
        colour_image(colour).save(directory / f"{colour}.png")
    return directory


def _write(path: Path, records: list, jsonl: bool = True) -> Path:
    if jsonl:
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    else:
        path.write_text(json.dumps(records))
    return path


def _imported(url: str) -> list[tuple]:
    rows = table_rows(url)
    return rows["outside_pairs"]


@pytest.mark.parametrize("jsonl", [True, False], ids=["jsonl", "json-list"])
def test_every_layout_is_read_into_one_pair_set(tmp_path, head_store_url, images, jsonl):
    file = _write(tmp_path / ("pairs.jsonl" if jsonl else "pairs.json"), [r for r, _ in RECORDS] + [TIED], jsonl)
    done = invoke_csr("pairs", "import", file, "--images", images, "--pair-set", "outside", db=head_store_url)
    assert done.returncode == 0, done.stderr
    assert f"imported pair set 'outside': {len(RECORDS)} pair(s)" in done.stdout
    assert "1 record(s) without a preference" in done.stdout

    rows = table_rows(head_store_url)
    [pair_set] = rows["pair_sets"]
    columns = ("id", "iteration", "name", "preset", "params", "selection_sql", "result_hash", "is_default",
               "created_at", "source", "origin")
    ps = dict(zip(columns, pair_set, strict=True))
    assert (ps["iteration"], ps["name"], ps["source"]) == (None, "outside", "import")
    origin = json.loads(ps["origin"]) if isinstance(ps["origin"], str) else ps["origin"]
    assert origin["file"] == file.name and origin["without_preference"] == 1
    assert origin["layouts"] == {"trl": 2, "llava": 2, "rlhf-v": 2, "vlfeedback": 1}
    by_position = {r[2]: r for r in rows["outside_pairs"]}
    for position, (_record, (prompt, chosen, rejected, external_id, _layout)) in enumerate(RECORDS, start=1):
        _id, _set, _pos, ext, _image, got_prompt, got_chosen, got_rejected = by_position[position]
        assert (got_prompt, got_chosen, got_rejected, ext) == (prompt, chosen, rejected, external_id)
    assert len(rows["images"]) == 4  # content-addressed: each image once
    assert rows["prompts"] == [] and rows["work_items"] == [], "imported pairs are not prompts to generate for"

    again = invoke_csr("pairs", "import", file, "--images", images, "--pair-set", "outside", db=head_store_url)
    assert again.returncode == 0, again.stderr
    assert "already imported" in again.stdout
    assert table_rows(head_store_url) == rows


BAD = [
    ({"prompt": "Describe.", "chosen": "a.", "rejected": "b."}, "missing or invalid image path"),
    ({"prompt": "Describe.", "chosen": "same.", "rejected": "same.", "image": "red.png"}, "same text"),
    ({"prompt": "Describe.", "chosen": "a.", "image": "red.png"}, "rejected is missing"),
    ({"prompt": "Describe.", "chosen": "a.", "rejected": "b.", "image": "nowhere.png"}, "image not found"),
    ({"prompt": "Describe.", "chosen": "a.", "rejected": "b.", "image": "../red.png"}, "escapes"),
    ({"prompt": "Describe.", "chosen": "a.", "rejected": "b.", "images": ["red.png", "blue.png"]}, "exactly one"),
    ({"ds_name": "x", "text": "{not json", "image_path": "red.png"}, "'text' is not a JSON object"),
    ({"id": "x", "image": "red.png", "conversations": [{"from": "human", "value": "Q?"}]}, "no 'chosen'"),
    ({"id": "x", "image": "red.png", "conversations": [{"from": "human", "value": "Q?"}],
      "output_1": "a", "output_2": "b", "preference": 3}, "'preference' must be 1 or 2"),
    ({"id": "v", "prompt": "Q?", "img_path": "red.png", "completions": [{"model": "m", "response": "a"}]},
     "fewer than two completions"),
    ({"question": "", "chosen": "a.", "rejected": "b.", "image_path": "red.png"}, "empty prompt text"),
    ({"something": "else"}, "unknown layout"),
    ([1, 2], "not a JSON object"),
]


def test_a_file_with_bad_records_is_refused_whole(tmp_path, head_store_url, images):
    good = invoke_csr("pairs", "import", _write(tmp_path / "good.jsonl", [RECORDS[0][0]]), "--images", images,
                      "--pair-set", "first", db=head_store_url)
    assert good.returncode == 0, good.stderr
    before = table_rows(head_store_url)

    lines = [json.dumps(record) for record, _ in BAD]
    lines.insert(3, "{not json")
    lines += [json.dumps(r) for r, _ in RECORDS]  # good records change nothing: all or nothing
    file = tmp_path / "bad.jsonl"
    file.write_text("\n".join(lines) + "\n")
    done = invoke_csr("pairs", "import", file, "--images", images, "--pair-set", "second", db=head_store_url)
    assert done.returncode == 1
    problems = [line for line in done.stderr.splitlines() if line.startswith(f"csr: {file}: record ")]
    assert len(problems) == len(BAD) + 1, done.stderr
    expected = [message for _, message in BAD]
    expected.insert(3, "not valid JSON")
    for line, message in zip(problems, expected, strict=True):
        assert message in line, (line, message)
    assert done.stderr.splitlines()[-1] == f"csr: error: {file}: {len(BAD) + 1} bad record(s); nothing imported"
    assert table_rows(head_store_url) == before

    # Other pairs under a name already taken: refused, nothing written.
    other = _write(tmp_path / "other.jsonl", [RECORDS[2][0]])
    taken = invoke_csr("pairs", "import", other, "--images", images, "--pair-set", "first", db=head_store_url)
    assert taken.returncode == 1 and "choose another --pair-set" in taken.stderr
    missing = invoke_csr("pairs", "import", other, "--images", tmp_path / "nope", "--pair-set", "x", db=head_store_url)
    assert missing.returncode == 1 and "images directory not found" in missing.stderr
    assert table_rows(head_store_url) == before


@pytest.mark.slow
def test_training_on_an_imported_pair_set(tmp_path, store_url, trained_llava_dir, tiny_clip_dir):
    study = make_study(tmp_path, store_url, trained_llava_dir, tiny_clip_dir, prompts=4)
    records = [{"id": f"gt{i}", "prompt": PROMPT, "image": f"{i}.png",
                "chosen": f"there is a big {colour} square.", "rejected": f"there is a big {wrong} square."}
               for i, (colour, wrong) in enumerate([("red", "green"), ("green", "blue"), ("blue", "yellow"),
                                                    ("yellow", "red")])]
    file = _write(tmp_path / "truth.jsonl", records)
    done = study.invoke("pairs", "import", file, "--images", "images", "--pair-set", "ground-truth")
    assert done.returncode == 0, done.stderr

    unknown = study.invoke("train", "--iter", "1", "--pair-set", "nothing-by-that-name")
    assert unknown.returncode == 1 and "no pair set named 'nothing-by-that-name' was imported" in unknown.stderr

    trained = study.invoke("train", "--iter", "1", "--pair-set", "ground-truth")
    assert trained.returncode == 0, trained.stderr
    assert study.query("SELECT number, method, state FROM iterations") == [(1, "outside", "trained")]
    assert study.query("SELECT COUNT(*) FROM work_items") == [(0,)]
    [(metrics,)] = study.query("SELECT metrics FROM model_versions WHERE version = 1")
    metrics = json.loads(metrics) if isinstance(metrics, str) else metrics
    assert metrics["reference"] == "recompute" and metrics["pairs"] == 4
    [(selection,)] = study.query("SELECT selection_sql FROM training_runs")
    assert "FROM outside_pairs" in selection

    lineage = json.loads(study.invoke("lineage", "--model-version", "1", "--json").stdout)
    assert lineage[0]["pair_set"]["source"] == "import"
    assert lineage[0]["pair_set"]["origin"]["file"] == "truth.jsonl"
    assert lineage[0]["generation"]["method"] == "outside"
    shown = study.invoke("lineage", "--model-version", "1")
    assert "pairs imported from" in shown.stdout and "truth.jsonl" in shown.stdout

    # Version 1 is a policy like any other: CSR's iteration 2 generates from it.
    assert study.invoke("generate", "--iter", "2", "--quiet").returncode == 0
