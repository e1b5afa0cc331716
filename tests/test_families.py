"""Every family engine/models drives, on a tiny random model built from its
config (engine/models/tiny.py), saved and loaded back as a user's checkpoint:

- the search's per-token log-probs equal the model's own forward pass over
  prompt + response (float32, 1e-5), for several prompts and images of
  different sizes (variable image-token counts, M-RoPE rope deltas);
- one group, one beam is the model's own greedy `generate` (ids exact), and
  so is group 0 of the search's first depth under `csr generate`'s settings;
- every response's log-prob sum is its teacher-forced log-prob (1e-4);
- the shared-prefix and the per-row search give the same beams;
- a pair of searched responses goes through DPO: with the tree reference,
  the step-1 loss is ln 2;
- `csr iterate` (generate, curate, train, register) runs on an SQLite store
  and the merged version searches the next iteration (slow)."""

from __future__ import annotations

import math

import pytest
import torch
from PIL import Image

from csr.engine.demo.tiny import save_pretrained
from csr.engine.loading import load_policy
from csr.engine.models import (
    ADAPTERS,
    UnsupportedModelError,
    adapter_for,
    adapter_for_type,
    check_family,
)
from csr.engine.models.tiny import BUILDERS, build_tiny
from csr.engine.search.beam_search import BeamSettings
from csr.engine.search.expansion import ExpandStats, PromptPrefix, expand_partials

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FAMILIES = [a.family for a in ADAPTERS if a.family in BUILDERS]
# The fast lane (make check) keeps one family of each hard kind: M-RoPE, sliding
# windows, variable image-token counts; make test runs them all.
FAST = {"Qwen2-VL", "Gemma 3", "LLaVA-NeXT"}
PROMPTS = ["describe this image in detail .", "what colour is the square on the left ?",
           "is there a cat on the right ?"]
TOL = 1e-5


def _images() -> list[Image.Image]:
    """Images of different sizes and contents (different image-token counts where the family varies them)."""
    g = torch.Generator().manual_seed(0)
    out = []
    for w, h in ((32, 32), (48, 24), (24, 56)):
        pixels = (torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy()
        out.append(Image.fromarray(pixels, "RGB"))
    return out


@pytest.fixture(scope="module", params=[
    pytest.param(f, marks=() if f in FAST else pytest.mark.slow) for f in FAMILIES])
def family(request, tmp_path_factory):
    model, processor = build_tiny(request.param)
    directory = save_pretrained(model, processor, tmp_path_factory.mktemp(request.param.replace(" ", "_")))
    return request.param, directory, load_policy(str(directory))


def _settings(policy, beams: int = 4, groups: int = 2) -> BeamSettings:
    return BeamSettings(num_beams=beams, num_beam_groups=groups, diversity_penalty=1.0,
                        eos_token_id=policy.eos_token_id, sentence_end_ids=policy.sentence_end_ids,
                        masked_ids=policy.masked_ids)


@torch.no_grad()
def _forward_logprobs(policy, image, prompt: str, ids: list[int]) -> list[float]:
    """log p(ids[i] | prompt, ids[:i]) from one plain forward pass over the whole sequence."""
    adapter = policy.adapter
    encoded = adapter.encode(policy.processor, [image], [prompt])
    response = torch.tensor([ids], dtype=torch.long)
    batch, _ = adapter.with_responses(encoded, response, torch.ones_like(response))
    logits = policy.model(**adapter.to_model(batch, policy.device, policy.model.dtype)).logits[0].float()
    start = encoded["input_ids"].shape[1]
    logprobs = torch.log_softmax(logits[start - 1 : -1], dim=-1)
    return logprobs.gather(-1, response[0, :, None]).squeeze(-1).tolist()


def _search(policy, image, prompt: str, attention: str, stats: ExpandStats | None = None):
    prefix = PromptPrefix(policy, image, prompt)
    first = expand_partials(prefix, [[]], [6], _settings(policy), attention=attention)[0]
    # Partials of different lengths continue in one padded batch.
    partials = [[], first[0].token_ids, first[-1].token_ids[:2]]
    return partials, expand_partials(prefix, partials, [5, 4, 6], _settings(policy), attention=attention,
                                     stats=stats)


def test_search_log_probs_equal_the_models_forward(family):
    _, _, policy = family
    for image, prompt in zip(_images(), PROMPTS, strict=True):
        for attention in ("cascade", "plain"):
            partials, found = _search(policy, image, prompt, attention)
            for partial, beams in zip(partials, found, strict=True):
                for beam in beams:
                    expected = _forward_logprobs(policy, image, prompt, [*partial, *beam.token_ids])[len(partial):]
                    assert beam.token_logprobs == pytest.approx(expected, abs=TOL), (attention, partial)


def test_shared_prefix_and_per_row_give_the_same_beams(family):
    _, _, policy = family
    image = _images()[1]
    # A family the table says shares the prefix does so at run time (no silent per-row fallback).
    assert PromptPrefix(policy, image, PROMPTS[0]).shares_prefix == (policy.adapter.per_row_reason is None)
    counted = {"cascade": ExpandStats(), "plain": ExpandStats()}
    _, shared = _search(policy, image, PROMPTS[0], "cascade", counted["cascade"])
    _, plain = _search(policy, image, PROMPTS[0], "plain", counted["plain"])
    # The useful work the bench's FLOP count reads: real tokens, keys attended, logit rows.
    work = {k: (s.tokens, s.attended, s.logit_rows) for k, s in counted.items()}
    assert work["cascade"] == work["plain"] and min(work["plain"]) > 0
    for a_beams, b_beams in zip(shared, plain, strict=True):
        assert [b.token_ids for b in a_beams] == [b.token_ids for b in b_beams]
        for a, b in zip(a_beams, b_beams, strict=True):
            assert a.token_logprobs == pytest.approx(b.token_logprobs, abs=TOL)


@torch.no_grad()
def _greedy(policy, image, prompt: str, max_new: int, stops) -> tuple[list[int], list[float]]:
    """transformers' own greedy `generate`: its ids and the log-probs of its logits."""
    inputs = policy.encode(image, prompt)
    out = policy.model.generate(
        **inputs, max_new_tokens=max_new, do_sample=False, num_beams=1, eos_token_id=list(stops),
        suppress_tokens=list(policy.masked_ids), output_logits=True, return_dict_in_generate=True,
    )
    ids = out.sequences[0, inputs["input_ids"].shape[1]:].tolist()
    return ids, [torch.log_softmax(step[0].float(), -1)[t].item() for step, t in zip(out.logits, ids, strict=False)]


def test_one_beam_is_the_models_greedy_generate(family):
    _, _, policy = family
    for image, prompt in zip(_images(), PROMPTS, strict=True):
        beam = expand_partials(PromptPrefix(policy, image, prompt), [[]], [8], _settings(policy, 1, 1))[0][0]
        ids, logprobs = _greedy(policy, image, prompt, 8, policy.stop_ids)
        assert beam.token_ids == ids
        assert beam.token_logprobs == pytest.approx(logprobs, abs=TOL)


def test_depth0_group0_of_the_search_is_the_models_greedy_generate(family):
    """The search's first depth as `csr generate` asks for it (default 5
    groups of one beam, diversity penalty 3): group 0, which pays no penalty,
    is greedy decoding to the first sentence end; it is among the depth's
    candidates with transformers' ids and log-probs."""
    from csr.engine.search.config import SearchConfig
    from csr.engine.search.sentence_search import search_beam_settings, sentence_search_steps

    _, _, policy = family
    config = SearchConfig(max_new_tokens=8)
    settings = search_beam_settings(policy, config)
    assert settings.num_beam_groups == settings.num_beams == 5
    for image, prompt in zip(_images(), PROMPTS, strict=True):
        partials, caps = next(sentence_search_steps(policy, config, prompt))
        [depth0] = expand_partials(PromptPrefix(policy, image, prompt), partials, caps, settings)
        ids, logprobs = _greedy(policy, image, prompt, caps[0], settings.stop_ids)
        [group0] = [b for b in depth0 if b.token_ids == ids][:1] or [None]
        assert group0 is not None, ([b.token_ids for b in depth0], ids)
        assert group0.token_logprobs == pytest.approx(logprobs, abs=1e-4)


def test_teacher_forced_log_probs_of_every_response_equal_its_sum(family, clip_scorer):
    """The sums the store keeps (log pi of the whole response, sentence after
    sentence, each depth from the shared-prefix search) are what a plain
    forward pass over prompt + response gives: the tree reference is exact."""
    from csr.engine.search.config import SearchConfig
    from csr.engine.search.sentence_search import sentence_beam_search
    from csr.engine.train.dpo_data import completion_logprob

    _, _, policy = family
    config = SearchConfig(max_new_tokens=4, max_length=10, num_token_beams=3, num_beam_groups=3, num_beams=3)
    responses = 0
    for image, prompt in zip(_images(), PROMPTS, strict=True):
        result = sentence_beam_search(policy, clip_scorer, image, prompt, config)
        for response in result.responses:
            forced = completion_logprob(policy.model, policy.processor, image, prompt, response.token_ids)
            assert forced == pytest.approx(response.logprob_sum, abs=1e-4)
            responses += 1
    assert responses >= 2


@pytest.mark.slow
def test_a_searched_pair_trains_one_dpo_step_at_ln2(family, tmp_path):
    from csr.engine.train.dpo import train_dpo
    from csr.engine.train.dpo_data import PreferenceExample
    from tests.worlds import FAST_CONFIG

    _, directory, policy = family
    image = _images()[2]
    image.save(tmp_path / "image.png")
    _, found = _search(policy, image, PROMPTS[0], "cascade")
    chosen, rejected = found[0][0], found[0][-1]
    example = PreferenceExample(
        image_path=str(tmp_path / "image.png"), prompt=PROMPTS[0], chosen_ids=chosen.token_ids,
        rejected_ids=rejected.token_ids, chosen_ref_logp=chosen.logprob_sum, rejected_ref_logp=rejected.logprob_sum,
    )
    config = FAST_CONFIG.replace(epochs=1, reference="tree")
    result = train_dpo(str(directory), [example], tmp_path / "model", tmp_path / "ckpt", config, device="cpu")
    # The tree's stored sums are log pi_ref exactly: policy == reference at step 1.
    assert result.metrics[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)
    again = load_policy(str(tmp_path / "model"))
    assert again.adapter is policy.adapter


def test_an_unsupported_family_is_refused_in_one_line_naming_the_supported(tmp_path):
    with pytest.raises(UnsupportedModelError) as refused:
        adapter_for_type("blip-2")
    message = str(refused.value)
    assert "\n" not in message and all(a.family in message for a in ADAPTERS)
    (tmp_path / "config.json").write_text('{"model_type": "llava_llama", "auto_map": {"AutoConfig": "x.Y"}}')
    with pytest.raises(UnsupportedModelError, match="remote code"):
        check_family(str(tmp_path))
    with pytest.raises(UnsupportedModelError, match="VILA needs the authors' remote code"):
        check_family("Efficient-Large-Model/VILA1.5-7b")


def test_every_family_type_has_one_adapter():
    types = [t for a in ADAPTERS for t in a.model_types]
    assert len(types) == len(set(types))
    for adapter in ADAPTERS:
        assert adapter_for_type(adapter.model_types[0]) is adapter


def test_llava_v1_is_refused_for_a_family_it_was_not_made_for(family):
    name, _, policy = family
    if "llava-v1" in policy.adapter.templates:
        assert policy.build_prompt("what is it ?", "llava-v1").endswith("ASSISTANT:")
    else:
        with pytest.raises(ValueError, match="LLaVA-1.5"):
            policy.build_prompt("what is it ?", "llava-v1")
    assert adapter_for(policy.model) is policy.adapter


def test_docs_models_md_is_generated_from_the_adapters():
    from pathlib import Path

    from csr.engine.models.docs import render

    written = (Path(__file__).resolve().parents[1] / "docs" / "models.md").read_text()
    assert written == render(), "docs/models.md is stale: python -m csr.engine.models.docs > docs/models.md"


def test_a_family_said_checked_has_a_tiny_model_the_tests_run():
    assert {a.family for a in ADAPTERS if a.checked} == set(FAMILIES)


def test_csr_init_refuses_an_unsupported_family_and_creates_nothing(tmp_path):
    from tests.cli_runner import invoke_csr

    model = tmp_path / "blip"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "blip-2"}')
    done = invoke_csr("init", "--model", str(model), cwd=tmp_path)
    assert done.returncode != 0
    line = done.stderr.strip()
    assert "\n" not in line and "'blip-2' is not a supported" in line and "Qwen2.5-VL" in line
    assert not (tmp_path / "csr.db").exists() and not (tmp_path / "csr.toml").exists()
    vila = invoke_csr("init", "--model", "Efficient-Large-Model/VILA1.5-7b", cwd=tmp_path)
    assert vila.returncode != 0 and "remote code" in vila.stderr
    assert not (tmp_path / "csr.db").exists()


def test_a_per_row_family_says_so_once(caplog):
    from csr.engine.search import expansion

    adapter = adapter_for_type("gemma3")
    expansion._PER_ROW_SAID.discard(adapter.family)
    with caplog.at_level("WARNING", logger=expansion.__name__):
        expansion._say_per_row(adapter)
        expansion._say_per_row(adapter)
    said = [r.getMessage() for r in caplog.records if adapter.family in r.getMessage()]
    assert len(said) == 1 and "sliding-window" in said[0]


# Sentences of at most 4 tokens and responses of at most 8: a random model
# seldom writes its end token, so each tree ends at the length limit with two
# responses a prompt, whatever the family (Gemma 3's never ended at 10 / 48).
E2E_SEARCH = {"max_new_tokens": 4, "max_length": 8}


@pytest.mark.slow
@pytest.mark.parametrize("name", FAMILIES)
def test_generate_curate_train_register_and_search_again(name, tmp_path, tiny_clip_dir):
    """generate -> curate -> train -> register through `csr iterate` on an
    SQLite store; every stored response's sum is its teacher-forced log-prob;
    DPO's step 1 with the tree reference is ln 2; the merged version reloads
    and searches the next iteration."""
    import json

    from csr.engine.train.dpo_data import completion_logprob
    from tests.study import make_study

    model, processor = build_tiny(name)
    model_dir = save_pretrained(model, processor, tmp_path / "model")
    study = make_study(tmp_path / "study", f"sqlite:///{tmp_path / 'store.db'}", model_dir, tiny_clip_dir, prompts=4,
                       search=E2E_SEARCH, train={"reference": "tree"})
    done = study.invoke("iterate", "--iter", "1", "--quiet", "--device", "cpu", "--dtype", "fp32", "--json")
    assert done.returncode == 0, done.stderr
    [result] = json.loads(done.stdout)
    assert result["trained"]["model_version"] == 1
    assert study.query("SELECT COUNT(*) FROM pairs")[0][0] >= 1

    policy = load_policy(str(model_dir))
    stored = study.query(
        "SELECT i.root, i.rel_path, p.text, r.token_ids, r.logprob_sum FROM responses r "
        "JOIN prompts p ON p.id = r.prompt_id JOIN images i ON i.id = p.image_id WHERE r.iteration = 1"
    )
    assert len(stored) >= 2
    for root, rel_path, prompt, token_ids, logprob_sum in stored:
        with Image.open(f"{root}/{rel_path}") as image:
            forced = completion_logprob(policy.model, policy.processor, image.convert("RGB"), prompt,
                                        json.loads(token_ids))
        assert forced == pytest.approx(logprob_sum, abs=1e-4)

    [(metrics, reference)] = study.query("SELECT metrics, hyperparams FROM training_runs WHERE iteration = 1")
    assert json.loads(reference)["reference"] == "tree"
    assert json.loads(metrics)[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)

    [(path,)] = study.query("SELECT path FROM model_versions WHERE version = 1")
    assert load_policy(path).adapter is policy.adapter
    again = study.invoke("generate", "--iter", "2", "--limit", "1", "--quiet", "--device", "cpu")
    assert again.returncode == 0, again.stderr
    assert study.query("SELECT policy_version FROM iterations WHERE number = 2") == [(1,)]
    assert study.query("SELECT COUNT(*) > 0 FROM candidates WHERE iteration = 2") == [(1,)]
