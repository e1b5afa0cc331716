"""Nothing a run stores can break it, and every text is the decode of its ids.

- The search never selects an id the model cannot take back as text (the
  image placeholder, special tokens other than EOS); training leaves out, names
  and counts a pair it cannot encode, or refuses under `unencodable = "refuse"`.
- Over random trees grown by random tiny models, with a byte-level BPE and the
  Llama-style byte-fallback tokenizer, under both presets: every response,
  every pair and every export is the portable decode of its token ids.
- `reference = "auto"` follows the dtype the iteration recorded.
"""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from sqlalchemy import text

from csr.engine import text as stored_text
from csr.engine.demo import tiny
from csr.engine.io.export import export_pairs
from csr.engine.iterations import _tree_is_exact
from csr.engine.loading import Policy, find_sentence_end_ids, placeholder_ids, unreturnable_ids
from csr.engine.search.beam_search import BeamSettings, group_beam_search
from csr.engine.search.config import SearchConfig
from csr.engine.search.sentence_search import sentence_beam_search
from csr.engine.train.config import TrainConfig
from csr.engine.train.dpo_data import PreferenceExample, find_unencodable
from csr.engine.worker_loop import tree_rows
from csr.storage import curation
from csr.storage.store import Store
from csr.storage.trees import insert_tree
from tests.llama_tokenizer import llama_style_tokenizer
from tests.test_faithful import CORPUS, _store_with_prompts

# ------------------------------------------------------------ masked ids


def _tiny_policy(tokenizer, seed: int) -> Policy:
    model, processor = tiny.build_tiny_llava(tokenizer, seed=seed)
    eos = tokenizer.eos_token_id
    return Policy(f"random-{seed}", model, processor, tokenizer, "cpu", find_sentence_end_ids(tokenizer), eos,
                  masked_ids=unreturnable_ids(model, processor, tokenizer, eos))


def test_the_masked_ids_are_the_placeholder_and_the_specials_but_eos(tiny_tokenizer):
    model, processor = tiny.build_tiny_llava(tiny_tokenizer, seed=0)
    eos = tiny_tokenizer.eos_token_id
    image = tiny_tokenizer.convert_tokens_to_ids(tiny.IMAGE_TOKEN)
    assert placeholder_ids(model.config, processor) == (image,)
    masked = unreturnable_ids(model, processor, tiny_tokenizer, eos)
    assert eos not in masked
    assert set(masked) == set(tiny_tokenizer.all_special_ids) - {eos}
    # an output layer wider than the tokenizer (real checkpoints pad it): the extra ids too
    model.resize_token_embeddings(len(tiny_tokenizer) + 3)
    widened = unreturnable_ids(model, processor, tiny_tokenizer, eos)
    assert set(widened) - set(masked) == set(range(len(tiny_tokenizer), len(tiny_tokenizer) + 3))


def test_a_masked_id_is_never_selected_and_log_probs_stay_the_models():
    vocab, masked, eos, stop = 12, (3, 7), 11, 10
    logits = torch.randn(2, vocab, generator=torch.Generator().manual_seed(0))
    logits[:, list(masked)] += 20.0  # by far the likeliest tokens

    def step(rows, tokens):
        nxt = torch.randn(len(rows), vocab, generator=torch.Generator().manual_seed(int(tokens.sum())))
        nxt[:, list(masked)] += 20.0
        nxt[:, stop] += 3.0
        return nxt

    settings = BeamSettings(4, 2, 1.0, eos, (stop,), masked_ids=masked)
    out = group_beam_search(logits.clone(), step, [5, 5], settings)
    assert all(beams for beams in out)
    for beams in out:
        for beam in beams:
            assert not set(beam.token_ids) & set(masked)
    # the first token's stored log-prob is the model's, not renormalised without the masked ids
    first = torch.log_softmax(logits[0], dim=-1)
    beam = out[0][0]
    assert beam.token_logprobs[0] == pytest.approx(float(first[beam.token_ids[0]]), abs=1e-6)
    unmasked = group_beam_search(logits.clone(), step, [5, 5], BeamSettings(4, 2, 1.0, eos, (stop,)))
    assert any(set(b.token_ids) & set(masked) for beams in unmasked for b in beams)


# --------------------------------------------------- unencodable pairs


def test_a_pair_holding_the_image_id_or_an_unreadable_image_is_found(tiny_llava_dir, tiny_tokenizer, tmp_path):
    image = tmp_path / "red.png"
    Image.new("RGB", (32, 32), (200, 30, 30)).save(image)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    image_id = tiny_tokenizer.convert_tokens_to_ids(tiny.IMAGE_TOKEN)
    eos = tiny_tokenizer.eos_token_id
    words = tiny_tokenizer("a red square", add_special_tokens=False).input_ids

    def pair(path, chosen, rejected=None):
        return PreferenceExample(str(path), "Describe the image.", chosen, rejected or [*words[:1], eos])

    examples = [
        pair(image, [*words, eos]),
        pair(image, [*words, image_id, eos]),
        pair(image, [*words, eos], [image_id, eos]),
        pair(image, [*words, len(tiny_tokenizer) + 5, eos]),
        pair(broken, [*words, eos]),
        pair(tmp_path / "missing.png", [*words, eos]),
    ]
    found = find_unencodable(examples, tiny_llava_dir)
    assert sorted(found) == [1, 2, 3, 4, 5]
    assert found[1] == f"the chosen response holds the image placeholder id {image_id}"
    assert found[2] == f"the rejected response holds the image placeholder id {image_id}"
    assert "outside the vocabulary" in found[3]
    assert found[4].startswith("the processor cannot encode its image and prompt")


@pytest.fixture(scope="module")
def image_prone_llava_dir(tmp_path_factory, trained_llava_dir, tiny_tokenizer):
    """The trained tiny LLaVA (it writes sentences, so trees give pairs) with
    the image placeholder made its likeliest first response token, as
    tests/test_faithful.py biases a model toward NUL."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from csr.engine.prompting import encode_prompts

    model = AutoModelForImageTextToText.from_pretrained(str(trained_llava_dir), dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(str(trained_llava_dir))
    image_id = tiny_tokenizer.convert_tokens_to_ids(tiny.IMAGE_TOKEN)
    encoded = encode_prompts(processor, [Image.new("RGB", (40, 36), (200, 30, 30))], ["Describe the image."])
    with torch.no_grad():
        out = model(**encoded, output_hidden_states=True)
        state = out.hidden_states[-1][0, -1]
        target = out.logits[0, -1].max().item() + 2.0
        model.lm_head.weight[image_id] = state * (target / state.dot(state).item())
        assert int(model(**encoded).logits[0, -1].argmax()) == image_id, "the bias must favour the image id"
    return tiny.save_pretrained(model, processor, tmp_path_factory.mktemp("image-prone-llava"))


def _ids(value) -> list[int]:
    return json.loads(value) if isinstance(value, str) else list(value)


def _all_rows(study) -> dict[str, list[tuple]]:
    tables = ("iterations", "work_items", "candidates", "responses", "pair_sets", "pairs", "training_runs",
              "model_versions")
    return {t: sorted(map(repr, study.query(f"SELECT * FROM {t}"))) for t in tables}


@pytest.mark.slow  # generate, curate and train twice per backend
@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_an_image_prone_model_completes_a_run_and_a_bad_pair_is_left_out(
    backend, tmp_path, request, image_prone_llava_dir, tiny_clip_dir, tiny_tokenizer
):
    from csr.engine.loading import load_policy
    from tests.study import make_study

    url = f"sqlite:///{tmp_path / 'csr.db'}" if backend == "sqlite" else request.getfixturevalue("postgres_url")
    study = make_study(tmp_path / "study", url, image_prone_llava_dir, tiny_clip_dir, prompts=6)
    done = study.invoke("generate", "--iter", "1", "--quiet")
    assert done.returncode == 0, done.stderr
    masked = set(load_policy(str(image_prone_llava_dir)).masked_ids)
    assert tiny_tokenizer.convert_tokens_to_ids(tiny.IMAGE_TOKEN) in masked
    stored = [_ids(r[0]) for r in study.query("SELECT token_ids FROM candidates")]
    assert stored and not any(masked & set(ids) for ids in stored)
    assert study.invoke("curate", "--iter", "1").returncode == 0
    done = study.invoke("train", "--iter", "1")
    assert done.returncode == 0, done.stderr
    assert "left out" not in done.stdout
    # no dtype recorded: the reference is recomputed, whatever the training machine
    assert "reference log-probs: recompute" in done.stdout

    # A pair holding the image id (as a tree searched without the mask could): named, counted, left out.
    [(external_id, chosen)] = study.query(
        "SELECT pr.external_id, p.chosen_candidate_id FROM pairs p "
        "JOIN prompts pr ON pr.id = p.prompt_id ORDER BY p.prompt_id LIMIT 1"
    )
    [(ids,)] = study.query("SELECT token_ids FROM responses WHERE leaf_candidate_id = :c", c=chosen)
    image_id = tiny_tokenizer.convert_tokens_to_ids(tiny.IMAGE_TOKEN)
    bad = json.dumps([image_id, *_ids(ids)])
    engine_url = url.replace("postgresql://", "postgresql+psycopg://", 1)
    from sqlalchemy import create_engine

    engine = create_engine(engine_url)
    with engine.begin() as conn:
        conn.execute(text("UPDATE responses SET token_ids = :t WHERE leaf_candidate_id = :c"), {"t": bad, "c": chosen})
    engine.dispose()
    pairs = study.query("SELECT COUNT(*) FROM pairs")[0][0]

    toml = study.directory / "csr.toml"
    settings = toml.read_text()
    toml.write_text(settings.replace("[train]\n", '[train]\nunencodable = "refuse"\n'))
    before = _all_rows(study)
    refused = study.invoke("train", "--iter", "1", "--force")
    assert refused.returncode != 0
    assert len(refused.stderr.strip().splitlines()) == 1
    assert f"prompt {external_id}: the chosen response holds the image placeholder id {image_id}" in refused.stderr
    assert _all_rows(study) == before

    toml.write_text(settings)
    done = study.invoke("train", "--iter", "1", "--force")
    assert done.returncode == 0, done.stderr
    assert f"pair of prompt {external_id} left out: the chosen response holds the image placeholder id" in done.stdout
    assert f"from {pairs - 1} pair(s)" in done.stdout
    [(metrics,)] = study.query("SELECT metrics FROM model_versions WHERE version = 1")
    metrics = json.loads(metrics) if isinstance(metrics, str) else metrics
    assert metrics["pairs_skipped_unencodable"] == 1
    assert metrics["unencodable_pairs"][0]["external_id"] == external_id


# ------------------------------------------- text is the decode, everywhere


def byte_level_tokenizer(corpus, vocab_size: int = 320):
    """A GPT-2-style byte-level BPE: every byte a token, decoded as bytes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(list(corpus), trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<pad>", "<unk>", "<s>", "</s>", tiny.IMAGE_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", extra_special_tokens={"image_token": tiny.IMAGE_TOKEN})


@pytest.fixture(scope="module")
def tokenizers_by_name():
    return {"byte-level": byte_level_tokenizer(CORPUS * 4), "llama-style": llama_style_tokenizer(CORPUS * 4)}


def _decode(tokenizer, ids) -> str:
    return stored_text.portable(tokenizer.decode(ids, skip_special_tokens=True))


@pytest.mark.parametrize("which", ["byte-level", "llama-style"])
@pytest.mark.parametrize("preset", ["paper", "reference-code"])
def test_every_response_pair_and_export_is_the_decode_of_its_ids(
    store_url, tmp_path, which, preset, tokenizers_by_name, clip_scorer, colour_images
):
    tok = tokenizers_by_name[which]
    config = SearchConfig(preset=preset, max_new_tokens=5, max_length=20, num_token_beams=3, num_beam_groups=3,
                          num_beams=3)
    seeds = range(6)
    model_dir = tmp_path / "model"  # only named by the iteration; the trees come from the policies below
    engine, prompt_ids = _store_with_prompts(store_url, tmp_path, model_dir, len(seeds), config)
    images = list(colour_images.values())
    inexact = 0
    try:
        for seed, prompt_id in zip(seeds, prompt_ids, strict=True):
            policy = _tiny_policy(tok, seed)
            result = sentence_beam_search(policy, clip_scorer, images[seed % len(images)],
                                          "Describe the image.", config)
            by_node = {r.node: r for r in result.records}
            for response in result.responses:
                assert response.text == _decode(tok, response.token_ids)
                path, node = [], response.leaf_node
                while node is not None:
                    path.append(by_node[node])
                    node = by_node[node].parent_node
                if all(c.text_exact for c in path):
                    assert "".join(c.text for c in reversed(path)) == response.text
            inexact += sum(not r.text_exact for r in result.records)
            with engine.begin() as conn:
                insert_tree(conn, 1, prompt_id, tree_rows(result))
        with engine.connect() as conn:
            rows = conn.execute(text("SELECT text, token_ids FROM responses")).all()
            flags = conn.execute(text("SELECT DISTINCT text_exact FROM candidates")).scalars().all()
        assert rows
        assert None not in flags
        for row in rows:
            assert row.text == _decode(tok, _ids(row.token_ids))
        with engine.begin() as conn:
            curation.record(conn, curation.compute_selection(conn, 1, curation.CurationSettings(preset=preset)))
            training = curation.training_rows(conn, curation.pair_set(conn, 1).id)
        assert training, "the random trees must give pairs"
        want = {}
        for r in training:
            assert r["chosen_text"] == _decode(tok, r["chosen_token_ids"])
            assert r["rejected_text"] == _decode(tok, r["rejected_token_ids"])
            want[r["external_id"]] = (r["chosen_text"], r["rejected_text"])
        store = Store(engine)
        llava, _ = export_pairs(store, 1, "llava-json", tmp_path / "pairs.json")
        assert {e["id"]: (e["conversations"][1]["value"], e["rejected_conversations"][1]["value"])
                for e in json.loads(llava.read_text())} == want
        trl, _ = export_pairs(store, 1, "trl-jsonl", tmp_path / "pairs.jsonl")
        assert {e["id"]: (e["chosen"][0]["content"][0]["text"], e["rejected"][0]["content"][0]["text"])
                for e in map(json.loads, trl.read_text().splitlines())} == want
        parquet, _ = export_pairs(store, 1, "parquet", tmp_path / "pairs.parquet")
        table = pq.read_table(parquet).to_pylist()
        assert {e["external_id"]: (e["chosen"], e["rejected"]) for e in table} == want
        for e in table:
            assert e["chosen"] == _decode(tok, e["chosen_token_ids"])
    finally:
        engine.dispose()
    if which == "llama-style" and preset == "paper":
        # The case that made texts wrong, a clean byte run rewritten by the next candidate,
        # occurs in these trees (under reference-code's release rules these seeds grow
        # longer sentences that happen not to split a byte run).
        assert inexact > 0


def test_a_clean_byte_run_rewritten_by_the_next_candidate_is_flagged():
    tok = llama_style_tokenizer(CORPUS * 4)
    from tests.llama_tokenizer import byte_ids, piece_ids

    parent_ids = piece_ids(tok, "the caf") + byte_ids(tok, "é".encode())
    parent = tok.decode(parent_ids)
    assert parent.endswith("é")
    child_ids = parent_ids + byte_ids(tok, b"\x80") + piece_ids(tok, " a")
    decoded = tok.decode(child_ids)
    step = stored_text.increment(stored_text.settled(parent), decoded, final=True)
    assert not step.exact
    assert stored_text.increment("the ca", decoded, final=True).exact


# ------------------------------------------------- reference = "auto"


class _Iterations:
    def __init__(self, config):
        self.config = config

    def iteration(self, number):
        return self


@pytest.mark.parametrize("cuda", [True, False])
def test_auto_reference_follows_the_recorded_dtype_not_the_training_machine(monkeypatch, cuda):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    auto = TrainConfig(reference="auto")
    assert _tree_is_exact(_Iterations({"dtype": "float32"}), 1, auto)
    assert not _tree_is_exact(_Iterations({"dtype": "bfloat16"}), 1, auto)
    assert not _tree_is_exact(_Iterations({}), 1, auto)  # nothing recorded: recompute
    assert _tree_is_exact(_Iterations({}), 1, TrainConfig(reference="tree"))
    assert not _tree_is_exact(_Iterations({"dtype": "float32"}), 1, TrainConfig(reference="recompute"))


def test_no_recorded_dtype_gives_examples_without_tree_log_probs():
    from csr.engine.iterations import preference_examples

    row = {"chosen_token_ids": [1, 2], "rejected_token_ids": [3], "chosen_logprob_sum": -1.0,
           "rejected_logprob_sum": -2.0, "image_root": "/i", "image_path": "a.png", "prompt": "p",
           "chosen_text": "a", "rejected_text": "b"}
    tree_reference = _tree_is_exact(_Iterations({}), 1, TrainConfig(reference="auto"))
    [example] = preference_examples([row], "unused", tree_reference=tree_reference)
    assert example.chosen_ref_logp is None and example.rejected_ref_logp is None
