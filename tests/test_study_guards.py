"""A study cannot be changed without a word: `csr generate` with a model that
cannot be found starts nothing, and an image replaced after import fails its
prompt instead of being searched; on both backends."""

from __future__ import annotations

import shutil

import pytest

from tests.db_backends import table_rows
from tests.study import Study, make_study
from tests.worlds import colour_image, write_prompts


def one_line_error(done) -> str:
    assert done.returncode != 0, done.stdout
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("csr: error: "), done.stderr
    return lines[0]


def test_generate_with_a_model_that_cannot_load_starts_no_iteration(store_url, tmp_path, tiny_clip_dir):
    """Before: iteration 1 stayed "generating" with a model that never loaded,
    and `csr init` refused every change. Now the model is checked before the
    iteration starts: one line, exit 1, every row as it was."""
    write_prompts(tmp_path, 2)
    not_a_model = tmp_path / "not-a-model"
    not_a_model.mkdir()
    study = Study(tmp_path, store_url, 2)
    assert study.invoke("init", "--model", str(not_a_model), "--clip", f"local-dir:{tiny_clip_dir}").returncode == 0
    assert study.invoke("prompts", "import", "prompts.jsonl", "--images", "images").returncode == 0
    before = table_rows(store_url)

    message = one_line_error(study.invoke("generate", "--iter", "1", "--quiet"))
    assert "could not load a vision-language model" in message and "not-a-model" in message
    assert table_rows(store_url) == before

    shutil.rmtree(not_a_model)
    assert "model directory not found" in one_line_error(study.invoke("generate", "--iter", "1", "--quiet"))
    assert table_rows(store_url) == before
    assert study.query("SELECT COUNT(*) FROM iterations") == [(0,)]


@pytest.mark.slow
def test_an_image_changed_since_import_fails_its_prompt_and_the_rest_go_on(
        tmp_path, store_url, trained_llava_dir, tiny_clip_dir):
    study = make_study(tmp_path, store_url, trained_llava_dir, tiny_clip_dir, prompts=3)
    # Still a valid image, of the same size: only the stored hash tells it apart.
    colour_image("blue", shift=7).save(study.directory / "images" / "1.png")

    done = study.invoke("generate", "--iter", "1", "--quiet", "--max-attempts", "1")
    assert done.returncode == 0, done.stderr
    states = dict(study.query(
        "SELECT p.external_id, w.state FROM work_items w JOIN prompts p ON p.id = w.prompt_id"))
    assert states == {"p0": "done", "p1": "failed", "p2": "done"}
    [(error,)] = study.query("SELECT last_error FROM work_items WHERE state = 'failed'")
    assert "image changed since import" in error and "1.png" in error
    assert study.query(
        "SELECT COUNT(*) FROM candidates c JOIN prompts p ON p.id = c.prompt_id WHERE p.external_id = 'p1'") == [(0,)]
    assert "image changed since import" in done.stderr
