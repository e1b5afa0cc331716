"""The faithful data path: what DPO trains on is exactly what was generated.

Generated ids -> stored candidate texts -> response rows -> pairs -> every
export format -> DPO input ids, on SQLite and PostgreSQL, with a Llama-style
SentencePiece tokenizer (byte fallback, "▁" spaces) and text like real LLaVA
output; and the curation SQL agrees with engine/rewards.py on random trees.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from sqlalchemy import insert, select, text

from csr.engine import text as stored_text
from csr.engine.demo import tiny
from csr.engine.io.export import export_pairs
from csr.engine.iterations import preference_examples
from csr.engine.prompting import chat_prompt
from csr.engine.search.beam_search import EOS, MAX_NEW_TOKENS, SENTENCE_END, TokenBeam
from csr.engine.search.config import SearchConfig
from csr.engine.search.sentence_search import run_sentence_search
from csr.engine.train.dpo_data import TokenPreferenceCollator
from csr.engine.worker_loop import tree_rows
from csr.storage import curation, iterations
from csr.storage import prompts as prompt_store
from csr.storage.models import Image as ImageRow
from csr.storage.models import Prompt
from csr.storage.store import Store, create_store
from csr.storage.trees import insert_tree
from csr.storage.versions import register_base_model
from tests.llama_tokenizer import byte_ids, llama_style_tokenizer, piece_ids

CORPUS = [
    "the price is 3.5 dollars. there is a red square on the left.",
    "a cat sits on the mat. the picture shows a wonderful day.",
    "items: 1. a ball 2. a box 3. a cup. shapes, e.g. circles, are round.",
]


class StubPolicy:
    """What the sentence search needs of a policy: a decode (and, under the
    release's rules, the EOS id and the prompt text, whose characters count)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.eos_token_id = tokenizer.eos_token_id

    def build_prompt(self, user_prompt, template="chat"):
        return chat_prompt(None, user_prompt, template)

    def decode(self, ids):
        return self.tokenizer.decode(ids, skip_special_tokens=True)


@pytest.fixture(scope="module")
def llama_tokenizer():
    return llama_style_tokenizer(CORPUS * 4)


@pytest.fixture(scope="module")
def llama_llava_dir(tmp_path_factory, llama_tokenizer):
    model, processor = tiny.build_tiny_llava(llama_tokenizer, seed=3)
    return tiny.save_pretrained(model, processor, tmp_path_factory.mktemp("llama-llava"))


def _tricky_chains(tok) -> list[tuple[str, list[list[tuple[list[int], str]]]]]:
    """(expected response text, segments) per response: each segment is a
    sentence as the token search returns it (ids, finish reason)."""
    eos = tok.eos_token_id

    def seg(s: str, reason: str = SENTENCE_END, extra: list[int] = ()) -> tuple[list[int], str]:
        return piece_ids(tok, s) + list(extra), reason

    return [
        ("The price is 3.5 dollars.", [seg("The price is 3."), seg("5 dollars.", EOS, [eos])]),
        (
            "Items:\n1. A ball.\n\n2. A box.",
            [seg("Items:\n1."), seg(" A ball.\n\n2."), seg(" A box.", EOS, [eos])],
        ),
        ("Shapes, e.g. circles.", [seg("Shapes, e."), seg("g. circles.", EOS, [eos])]),
        # a sentence cut at max_new_tokens inside a word, then inside a character
        ("It is a wonderful café day.", [
            seg("It is a wonder", MAX_NEW_TOKENS),
            (piece_ids(tok, "ful caf") + byte_ids(tok, "é".encode()[:1]), MAX_NEW_TOKENS),
            (byte_ids(tok, "é".encode()[1:]) + piece_ids(tok, " day.") + [eos], EOS),
        ]),
        # NUL and invalid UTF-8 from byte tokens: stored as U+FFFD, ids exact
        ("A zero \ufffd byte here.", [(piece_ids(tok, "A zero ") + byte_ids(tok, b"\x00") + piece_ids(tok, " byte here.") + [eos], EOS)]),
        ("Bad \ufffd\ufffd bytes now.", [(piece_ids(tok, "Bad ") + byte_ids(tok, b"\xff\xfe") + piece_ids(tok, " bytes now.") + [eos], EOS)]),
        ("Naïve Ångström, 中文 text.", [seg("Naïve Ångström, 中文 text.", EOS, [eos])]),
        ("The cat sits.", [seg("The cat sits."), ([eos], EOS)]),  # an end marker after a sentence
    ]


def _scripted_expand(chains, lengths):
    """The token search of a stub model that follows the given chains."""
    table: dict[tuple, list[TokenBeam]] = {}
    for _, segments in chains:
        prefix: tuple = ()
        for ids, reason in segments:
            beams = table.setdefault(prefix, [])
            if not any(b.token_ids == ids for b in beams):
                beams.append(TokenBeam(list(ids), [-0.1 * (len(beams) + 1)] * len(ids), reason, -0.1 * (len(beams) + 1)))
            prefix = prefix + tuple(ids)

    def expand(partials, caps):
        for p in partials:
            lengths.append(len(p))
        return [table[tuple(p)] for p in partials]

    return expand


def _fake_clip(texts):
    return [10.0 + (sum(map(ord, t)) % 17) for t in texts]


def _store_with_prompts(url: str, tmp_path: Path, model_dir: Path, n: int, config: SearchConfig):
    engine, _ = create_store(url)
    images = tmp_path / "images"
    images.mkdir(exist_ok=True)
    with engine.begin() as conn:
        register_base_model(conn, str(model_dir), "local-dir:none", None)
        for i in range(n):
            Image.new("RGB", (32, 32), (40 * i % 255, 90, 200)).save(images / f"{i}.png")
            conn.execute(insert(ImageRow).values(sha256=f"{i:064d}", root=str(images), rel_path=f"{i}.png",
                                                 size_bytes=1, width=32, height=32))
        image_ids = list(conn.execute(select(ImageRow.id).order_by(ImageRow.id)).scalars())
        prompt_store.insert_prompts(conn, [
            {"external_id": f"p{i}", "image_id": image_ids[i], "text": "<image>\nDescribe the image.", "source": "t"}
            for i in range(n)
        ])
        prompt_ids = list(conn.execute(select(Prompt.id).order_by(Prompt.id)).scalars())
    iterations.start_iteration(engine, 1, config.preset, {"search": config.to_dict(), "policy_version": 0,
                                                    "policy_path": str(model_dir)})
    return engine, prompt_ids


def _path_texts(conn, iteration: int, prompt_id: int) -> dict[int, str]:
    rows = conn.execute(
        text("SELECT node, parent_node, text FROM candidates WHERE iteration = :i AND prompt_id = :p"),
        {"i": iteration, "p": prompt_id},
    ).all()
    by_node = {r.node: r for r in rows}

    def path_text(node):
        parts = []
        while node is not None:
            parts.append(by_node[node].text)
            node = by_node[node].parent_node
        return "".join(reversed(parts))

    return {node: path_text(node) for node in by_node}


def test_generated_ids_reach_dpo_unchanged(store_url, tmp_path, llama_tokenizer, llama_llava_dir):
    tok = llama_tokenizer
    chains = _tricky_chains(tok)
    config = SearchConfig(degenerate_rules="reference-code")  # 中文 is kept, as the released rules keep it
    # two responses per prompt: chain i against chain i + 1, so every chain is in a pair
    scripts = [[chains[i], chains[(i + 1) % len(chains)]] for i in range(len(chains))]
    engine, prompt_ids = _store_with_prompts(store_url, tmp_path, llama_llava_dir, len(scripts), config)
    try:
        expected = {}
        for prompt_id, script in zip(prompt_ids, scripts, strict=True):
            result = run_sentence_search(StubPolicy(tok), config, _scripted_expand(script, []), _fake_clip)
            assert sorted(r.text for r in result.responses) == sorted(want for want, _ in script)
            with engine.begin() as conn:
                insert_tree(conn, 1, prompt_id, tree_rows(result))
            expected[prompt_id] = {r.text: r.token_ids for r in result.responses}
        with engine.connect() as conn:
            rows = conn.execute(text("SELECT prompt_id, leaf_node, text, token_ids, has_token_ids FROM responses")).all()
            assert len(rows) == 2 * len(scripts)
            for row in rows:
                ids = row.token_ids if isinstance(row.token_ids, list) else json.loads(row.token_ids)
                assert row.has_token_ids
                assert ids == expected[row.prompt_id][row.text]
                assert row.text == stored_text.portable(tok.decode(ids, skip_special_tokens=True))
                assert row.text == _path_texts(conn, 1, row.prompt_id)[row.leaf_node]
        with engine.begin() as conn:
            result = curation.record(conn, curation.compute_selection(conn, 1, curation.CurationSettings()))
            ps = curation.pair_set(conn, 1)
            rows = curation.training_rows(conn, ps.id)
        assert result.pairs == len(scripts)
        for r in rows:
            assert r["chosen_token_ids"] == expected[r["prompt_id"]][r["chosen_text"]]
            assert r["rejected_token_ids"] == expected[r["prompt_id"]][r["rejected_text"]]
        pair_texts = {(r["external_id"], r["chosen_text"], r["rejected_text"]) for r in rows}

        llava, _ = export_pairs(Store(engine), 1, "llava-json", tmp_path / "pairs.json")
        exported = {(e["id"], e["conversations"][1]["value"], e["rejected_conversations"][1]["value"])
                    for e in json.loads(llava.read_text())}
        assert exported == pair_texts
        trl, _ = export_pairs(Store(engine), 1, "trl-jsonl", tmp_path / "pairs.jsonl")
        lines = [json.loads(line) for line in trl.read_text().splitlines()]
        assert {(e["id"], e["chosen"][0]["content"][0]["text"], e["rejected"][0]["content"][0]["text"])
                for e in lines} == pair_texts
        parquet, _ = export_pairs(Store(engine), 1, "parquet", tmp_path / "pairs.parquet")
        table = pq.read_table(parquet).to_pylist()
        assert {(e["external_id"], e["chosen"], e["rejected"]) for e in table} == pair_texts
        assert all(e["chosen_token_ids"] == expected_ids for e, expected_ids in
                   ((e, expected[e["prompt_id"]][e["chosen"]]) for e in table))

        from transformers import AutoProcessor

        processor = AutoProcessor.from_pretrained(llama_llava_dir)
        examples = preference_examples(rows, str(llama_llava_dir))
        collate = TokenPreferenceCollator(processor, tok.pad_token_id)
        for r, e in zip(rows, examples, strict=True):
            batch = collate([{"images": [e.image_path], "prompt": e.prompt, "chosen_ids": e.chosen_ids,
                              "rejected_ids": e.rejected_ids}])
            completions = [batch["input_ids"][k][batch["completion_mask"][k].bool()].tolist() for k in (0, 1)]
            assert completions == [r["chosen_token_ids"], r["rejected_token_ids"]]
    finally:
        engine.dispose()


# ------------------------------------------------------- SQL agrees with Python


def _random_expand(tok, rng: random.Random):
    """Random sentences over the Llama vocabulary, with end markers, "\\n"-only
    and blank candidates, EOS after sentences, and ties in beam scores."""
    eos = tok.eos_token_id
    words = ["red", "cat", "box", "is", "on", "the", "mat", "3.5", "big", "blue"]

    def sentence():
        kind = rng.random()
        if kind < 0.12:
            return [eos], EOS  # an end marker
        if kind < 0.2:
            return piece_ids(tok, "\n"), SENTENCE_END  # "\n" only: too short, excluded
        if kind < 0.25:
            return piece_ids(tok, "  "), MAX_NEW_TOKENS  # blank: excluded
        ids = piece_ids(tok, " " + " ".join(rng.choice(words) for _ in range(rng.randint(2, 5))) + ".")
        if rng.random() < 0.3:
            return ids + [eos], EOS
        return ids, SENTENCE_END

    def expand(partials, caps):
        out = []
        for p in partials:
            beams = []
            for _ in range(4):
                ids, reason = sentence()
                if len(p) > 120:
                    ids, reason = ids[:-1] + [eos] if reason != EOS else ids, EOS
                lps = [-rng.choice([0.5, 1.0, 1.5]) for _ in ids]
                beams.append(TokenBeam(ids, lps, reason, rng.choice([-1.0, -0.5, -2.0])))
            out.append(beams)
        return out

    return expand


def _python_pairs(responses, preset: str, lam: float, leaf_ids: dict[int, int]):
    scored = [(r.score(preset, lam), leaf_ids[r.leaf_node], r) for r in responses]
    best = max(scored, key=lambda s: (s[0], -s[1]))
    others = [s for s in scored if s[2].text != best[2].text]
    if not others:
        return None
    worst = min(others, key=lambda s: (s[0], s[1]))
    return best[1], worst[1], best[0], worst[0]


@pytest.mark.parametrize("grown_under", ["paper", "reference-code"])
def test_curation_sql_equals_the_python_formulas(store_url, tmp_path, llama_tokenizer, llama_llava_dir, grown_under):
    tok = llama_tokenizer
    config = SearchConfig(preset=grown_under, num_token_beams=4, num_beam_groups=4)
    engine, prompt_ids = _store_with_prompts(store_url, tmp_path, llama_llava_dir, 6, config)
    try:
        trees = {}
        for k, prompt_id in enumerate(prompt_ids):
            result = run_sentence_search(StubPolicy(tok), config, _random_expand(tok, random.Random(k)), _fake_clip)
            assert result.stats.max_active <= config.num_beams
            with engine.begin() as conn:
                insert_tree(conn, 1, prompt_id, tree_rows(result))
                leaf_ids = dict(conn.execute(text(
                    "SELECT leaf_node, leaf_candidate_id FROM responses WHERE iteration = 1 AND prompt_id = :p"
                ), {"p": prompt_id}).all())
            trees[prompt_id] = (result, leaf_ids)
        for preset in ("paper", "reference-code"):
            for lam in (0.0, 0.5, 0.9, 1.0):
                with engine.begin() as conn:
                    rows = curation.select_pairs(conn, 1, curation.CurationSettings(preset, lam))
                got = {r["prompt_id"]: (r["chosen_candidate_id"], r["rejected_candidate_id"],
                                        r["chosen_reward"], r["rejected_reward"]) for r in rows}
                want = {}
                for prompt_id, (result, leaf_ids) in trees.items():
                    pair = _python_pairs(result.responses, preset, lam, leaf_ids)
                    if pair is not None:
                        want[prompt_id] = pair
                assert got.keys() == want.keys(), (preset, lam)
                for prompt_id in want:
                    assert got[prompt_id][:2] == want[prompt_id][:2], (preset, lam, prompt_id)
                    assert got[prompt_id][2:] == pytest.approx(want[prompt_id][2:], abs=1e-9)
    finally:
        engine.dispose()


# ----------------------------------------- the stored log-probs are pi_{N-1}'s


@pytest.mark.parametrize("which", ["word-level", "llama-style"])
def test_teacher_forced_logprobs_equal_the_stored_sums(which, llava_dir_of, clip_scorer, colour_images):
    from csr.engine.loading import load_policy
    from csr.engine.search.sentence_search import sentence_beam_search
    from csr.engine.train.dpo_data import completion_logprob

    model_dir = llava_dir_of(which)
    policy = load_policy(str(model_dir))
    config = SearchConfig(max_new_tokens=6, max_length=24, num_token_beams=3, num_beam_groups=3, num_beams=3)
    image = colour_images["red"]
    result = sentence_beam_search(policy, clip_scorer, image, "Describe the image.", config)
    assert result.responses
    for response in result.responses:
        forced = completion_logprob(policy.model, policy.processor, image, "Describe the image.", response.token_ids)
        assert forced == pytest.approx(response.logprob_sum, abs=1e-4)
        assert response.text == stored_text.portable(policy.decode(response.token_ids))


@pytest.fixture(scope="module")
def llava_dir_of(tiny_llava_dir, llama_llava_dir):
    return {"word-level": tiny_llava_dir, "llama-style": llama_llava_dir}.get



# ------------------------------------ text PostgreSQL cannot hold, end to end


class SurrogatePolicy(StubPolicy):
    """A policy whose decode yields a lone surrogate where "~" was generated
    (a Python str can hold one; UTF-8 and both stores cannot)."""

    def decode(self, ids):
        return super().decode(ids).replace("~", "\udc80")


def test_nul_invalid_bytes_and_a_lone_surrogate_are_stored_alike(store_url, tmp_path, llama_tokenizer,
                                                                llama_llava_dir):
    tok = llama_tokenizer
    eos = tok.eos_token_id
    chains = [
        ("Nul \ufffd here.", [(piece_ids(tok, "Nul ") + byte_ids(tok, b"\x00") + piece_ids(tok, " here.") + [eos], EOS)]),
        ("Bad \ufffd\ufffd\ufffd end.", [(piece_ids(tok, "Bad ") + byte_ids(tok, b"\xe2\x28\xa1") + piece_ids(tok, " end.") + [eos], EOS)]),
        ("Lone \ufffd mark.", [(piece_ids(tok, "Lone ~ mark.") + [eos], EOS)]),
    ]
    config = SearchConfig()
    engine, [prompt_id] = _store_with_prompts(store_url, tmp_path, llama_llava_dir, 1, config)
    try:
        result = run_sentence_search(SurrogatePolicy(tok), config, _scripted_expand(chains, []), _fake_clip)
        with engine.begin() as conn:
            insert_tree(conn, 1, prompt_id, tree_rows(result))
        with engine.connect() as conn:
            stored = sorted(conn.execute(text("SELECT text FROM responses")).scalars())
        assert stored == sorted(want for want, _ in chains)
    finally:
        engine.dispose()


@pytest.fixture(scope="module")
def nul_prone_llava_dir(tmp_path_factory, llama_tokenizer):
    """The Llama-style random model with the NUL byte token made the most
    likely first token of a response, so that a real search generates it."""
    from csr.engine.prompting import encode_prompts

    model, processor = tiny.build_tiny_llava(llama_tokenizer, seed=5)
    nul = llama_tokenizer.convert_tokens_to_ids("<0x00>")
    encoded = encode_prompts(processor, [Image.new("RGB", (40, 36), (200, 30, 30))], ["Describe the image."])
    with torch.no_grad():
        out = model(**encoded, output_hidden_states=True)
        state = out.hidden_states[-1][0, -8:].mean(dim=0)
        target = out.logits[0, -1].max().item() + 0.3
        model.lm_head.weight[nul] = state * (target / state.dot(state).item())
    return tiny.save_pretrained(model, processor, tmp_path_factory.mktemp("nul-llava"))


@pytest.mark.slow  # end to end: two worker processes per backend, a minute or more
def test_generate_with_two_workers_stores_the_same_pairs_on_both_backends(
    tmp_path, postgres_url, nul_prone_llava_dir, tiny_clip_dir, llama_tokenizer
):
    from tests.study import make_study

    nul = llama_tokenizer.convert_tokens_to_ids("<0x00>")
    pairs = []
    for name, url in (("lite", f"sqlite:///{tmp_path / 'lite.db'}"), ("pg", postgres_url)):
        study = make_study(tmp_path / name, url, nul_prone_llava_dir, tiny_clip_dir, prompts=12)
        done = study.invoke("generate", "--iter", "1", "--workers", "2", "--quiet")
        assert done.returncode == 0, done.stderr
        assert study.query("SELECT state, COUNT(*) FROM work_items GROUP BY state") == [("done", 12)]
        ids = [json.loads(r[0]) if isinstance(r[0], str) else r[0]
               for r in study.query("SELECT token_ids FROM candidates")]
        assert any(nul in i for i in ids), "the run must generate a NUL byte"
        assert study.invoke("curate", "--iter", "1").returncode == 0
        pairs.append(study.query(
            "SELECT pr.external_id, p.chosen_text, p.rejected_text FROM pairs p "
            "JOIN prompts pr ON pr.id = p.prompt_id ORDER BY pr.external_id"
        ))
    assert pairs[0] == pairs[1] and pairs[0]
