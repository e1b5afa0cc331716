"""One CSR iteration's curate and train steps, with their order rules.

Each step is idempotent, so `csr iterate` can be resumed at any point: a
generated iteration is not generated again, an existing pair set is
confirmed, an existing model version is kept.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from csr.engine import outside_pairs as outside
from csr.engine.errors import CsrError
from csr.engine.settings import Settings
from csr.storage import (
    CLAIMED,
    PENDING,
    PRESET_PAIR_RULE,
    CurationResult,
    CurationSettings,
    NotGenerated,
    OrderError,
    Store,
    json_digest,
)


def iteration_curation(store: Store, iteration: int) -> CurationSettings:
    """The curation settings matching how the iteration was generated."""
    it = store.iteration(iteration)
    if it is None:
        raise NotGenerated(iteration)
    search = it.config.get("search", {})
    # "lam" is the recorded [generate] key: stored configs keep it as written.
    return CurationSettings(preset=it.preset, lam=float(search.get("lam", 0.9)),
                            pair_rule=PRESET_PAIR_RULE[it.preset])


def require_generated(store: Store, iteration: int, allow_partial: bool) -> dict[str, int]:
    if store.iteration(iteration) is None:
        raise NotGenerated(iteration)
    counts = store.progress(iteration)
    unfinished = counts[PENDING] + counts[CLAIMED]
    if unfinished and not allow_partial:
        raise OrderError(
            f"generation of iteration {iteration} is not complete ({unfinished} prompt(s) pending or claimed): "
            f"finish `csr generate --iter {iteration}` or pass --allow-partial"
        )
    return counts


def curate(
    store: Store,
    iteration: int,
    preset: str | None = None,
    lambda_weight: float | None = None,
    min_margin: float = 0.0,
    name: str | None = None,
    make_default: bool = False,
    pair_rule: str | None = None,
) -> CurationResult:
    """`lambda_weight` (the weight of R_I) defaults to the iteration's;
    `pair_rule` to the preset's own (PRESET_PAIR_RULE)."""
    it = store.iteration(iteration)
    if it is not None and it.method != "csr":
        return _curate_other_method(store, it, preset, lambda_weight, min_margin, name, make_default)
    base = iteration_curation(store, iteration)
    preset = preset or base.preset
    settings = CurationSettings(
        preset=preset, lam=base.lam if lambda_weight is None else lambda_weight, min_margin=min_margin,
        pair_rule=pair_rule or PRESET_PAIR_RULE[preset],
    )
    return store.curate(iteration, settings, name=name, make_default=make_default)


def _curate_other_method(store: Store, it, preset, lambda_weight, min_margin, name, make_default) -> CurationResult:
    """A self-rewarding iteration's pairs come from its judgements; an outside one has none to curate."""
    if it.method == "self-reward":
        if preset is not None or lambda_weight is not None:
            raise CsrError(f"--preset and --lambda re-curate a csr tree; iteration {it.number} is self-rewarding")
        return store.curate_self_reward(it.number, min_margin, name, make_default)
    raise OrderError(f"iteration {it.number} trains on the imported pair set "
                     f"{it.config.get('pair_set')!r}: it has nothing to curate")


@dataclass(frozen=True)
class TrainOptions:
    allow_partial: bool = False
    force: bool = False
    pair_set: str | None = None
    device: str | None = None


@dataclass(frozen=True)
class TrainOutcome:
    version: int
    path: Path
    weights_hash: str
    pairs: int
    skipped_too_long: int
    reference: str
    resumed_from_step: int | None
    train_seconds: float
    final_metrics: dict
    # (external id of the prompt, why) of each pair left out as unencodable
    skipped_unencodable: tuple[tuple[str, str], ...] = ()


def _is_main_process() -> bool:
    # Under `accelerate launch` every rank runs this command; only rank 0 writes the store.
    return int(os.environ.get("RANK", "0")) == 0


def train(store: Store, settings: Settings, iteration: int, options: TrainOptions) -> TrainOutcome:
    """Train model version N from N-1 on iteration N's pair set and register it.
    A run killed midway resumes from its checkpoint when started again with
    the same pairs and settings."""
    from csr.engine.train.config import TrainConfig, TrainConfigError
    from csr.engine.train.dpo import train_dpo

    try:
        config = TrainConfig.from_dict(settings.train)
    except TrainConfigError as exc:
        raise CsrError(f"[train] in {settings.path}: {exc}") from exc
    imported = outside.imported_for(store, iteration, options.pair_set)
    existing, parent = _check_order(store, iteration, options)
    pair_set, rows, too_long = _pairs_to_train(store, iteration, options.pair_set, config, imported, parent.path)
    examples = preference_examples(rows, parent.path, tree_reference=_tree_is_exact(store, iteration, config),
                                   prompt_template=_prompt_template(store, iteration))
    rows, examples, unencodable = _drop_unencodable(pair_set.name, rows, examples, parent.path, config)
    pairs_hash = json_digest(rows, default=str)
    hyperparams = config.to_dict()

    models_dir = settings.models_path()
    output_dir = models_dir / f"v{iteration}"
    checkpoint_dir = models_dir / f"v{iteration}.checkpoints"
    main = _is_main_process()
    run_id = None
    if main:
        run_id = store.begin_training_run(iteration, pair_set.id, outside.selection_of(pair_set), pairs_hash,
                                          hyperparams, str(checkpoint_dir))
    staging = models_dir / f"v{iteration}.staging"
    try:
        result = train_dpo(parent.path, examples, staging, checkpoint_dir, config, device=options.device)
    except BaseException:
        if main:
            store.mark_run(run_id, "failed")
        raise
    final = result.metrics[-1] if result.metrics else {}
    outcome = TrainOutcome(
        version=iteration,
        path=output_dir,
        weights_hash=result.weights_hash,
        pairs=len(rows),
        skipped_too_long=len(too_long),
        reference=result.extra["reference"],
        skipped_unencodable=tuple(unencodable),
        resumed_from_step=result.resumed_from_step,
        train_seconds=result.train_seconds,
        final_metrics=final,
    )
    if main:
        if output_dir.exists():
            shutil.rmtree(output_dir)
        staging.rename(output_dir)
        store.register_version(
            version=iteration,
            parent=iteration - 1,
            iteration=iteration,
            path=str(output_dir.resolve()),
            weights_hash=result.weights_hash,
            lora_config=result.lora_config,
            metrics={"final": final, "train_seconds": result.train_seconds, "pairs": outcome.pairs,
                     "pairs_skipped_too_long": outcome.skipped_too_long, "reference": outcome.reference,
                     "pairs_skipped_unencodable": len(unencodable),
                     "unencodable_pairs": [{"external_id": e, "reason": why} for e, why in unencodable]},
            run_id=run_id,
            run_metrics=result.metrics,
            replace=existing is not None,
        )
        shutil.rmtree(checkpoint_dir, ignore_errors=True)
    return outcome


def _check_order(store: Store, iteration: int, options: TrainOptions):
    """(existing version N or None, version N-1), or OrderError when N cannot be trained now."""
    require_generated(store, iteration, options.allow_partial)
    existing = store.model_version(iteration)
    parent = store.model_version(iteration - 1)
    next_iteration = store.iteration(iteration + 1)
    if existing is not None and not options.force:
        raise OrderError(f"model version {iteration} exists ({existing.path}); pass --force to train it again")
    if existing is not None and next_iteration is not None:
        raise OrderError(
            f"model version {iteration} cannot be replaced: iteration {iteration + 1} was generated from it"
        )
    if parent is None:
        raise OrderError(f"model version {iteration - 1} does not exist")
    return existing, parent


def _pairs_to_train(store: Store, iteration: int, name: str | None, config, imported=None, policy_path=""):
    """(pair set, rows that fit, rows over max_response_tokens); train implies
    curate with the iteration's own policy when it has no default pair set.
    An imported pair set's texts are tokenised here (they have no tree)."""
    pair_set = imported or store.pair_set(iteration, name)
    if pair_set is None:
        if name:
            raise OrderError(f"iteration {iteration} has no pair set named {name!r}, and no pair set of that "
                             "name was imported (`csr pairs import`)")
        curate(store, iteration)
    pair_set = pair_set or store.pair_set(iteration)
    rows = (outside.tokenised(store.outside_training_rows(pair_set.id), policy_path) if imported
            else store.training_rows(pair_set.id))
    if not rows:
        raise OrderError(
            f"pair set {pair_set.name!r} of iteration {iteration} is empty: nothing to train on "
            "(no prompt had two distinct final responses above the margin)"
        )
    rows, too_long = split_too_long(rows, config.max_response_tokens)
    if too_long and config.too_long == "refuse":
        raise OrderError(
            f"{len(too_long)} pair(s) of pair set {pair_set.name!r} have a response longer than "
            f"max_response_tokens ({config.max_response_tokens}); raise it, or set too_long = \"skip\" in [train]"
        )
    if not rows:
        raise OrderError(
            f"every pair of pair set {pair_set.name!r} has a response longer than max_response_tokens "
            f"({config.max_response_tokens}): nothing to train on"
        )
    return pair_set, rows, too_long


def _drop_unencodable(pair_set_name: str, rows: list[dict], examples: list, model_path: str, config):
    """(rows, examples, [(external id, reason)]) without the pairs the model
    cannot train on; under unencodable = "refuse", an OrderError naming them."""
    from csr.engine.train.dpo_data import find_unencodable

    bad = find_unencodable(examples, model_path)
    if not bad:
        return rows, examples, []
    named = [(str(rows[i]["external_id"]), why) for i, why in sorted(bad.items())]
    if config.unencodable == "refuse":
        first_id, first_why = named[0]
        raise OrderError(
            f"{len(named)} pair(s) of pair set {pair_set_name!r} cannot be encoded for training "
            f"(prompt {first_id}: {first_why}); set unencodable = \"skip\" in [train] to leave them out"
        )
    keep = [i for i in range(len(rows)) if i not in bad]
    if not keep:
        raise OrderError(
            f"no pair of pair set {pair_set_name!r} can be encoded for training "
            f"(prompt {named[0][0]}: {named[0][1]}): nothing to train on"
        )
    return [rows[i] for i in keep], [examples[i] for i in keep], named


def split_too_long(rows: list[dict], max_response_tokens: int) -> tuple[list[dict], list[dict]]:
    """Pairs whose responses fit, and those with a response over the limit."""
    fits, too_long = [], []
    for r in rows:
        longest = max(r["chosen_token_count"], r["rejected_token_count"])
        (too_long if longest > max_response_tokens else fits).append(r)
    return fits, too_long


def _tree_is_exact(store: Store, iteration: int, config) -> bool:
    """Whether the stored log-probs may stand for the reference pass: always
    under reference = "tree", under "auto" only for trees the iteration
    recorded as searched in float32. The training machine says nothing about
    how the tree was searched, so an iteration without a recorded dtype (a
    GPU search without --dtype runs in the checkpoint's half precision) is
    recomputed."""
    if config.reference != "auto":
        return config.reference == "tree"
    return store.iteration(iteration).config.get("dtype") in ("float32", "fp32")


def _prompt_template(store: Store, iteration: int) -> str:
    """The template the iteration's trees were searched with: DPO scores each
    response in the context it was generated in."""
    from csr.engine.search.config import SearchConfig

    return SearchConfig.from_recorded(store.iteration(iteration).config.get("search", {})).prompt_template


def preference_examples(rows: list[dict], policy_path: str, tree_reference: bool = True,
                        prompt_template: str = "chat"):
    """Training examples from `curation.training_rows`: the stored token ids and
    (with `tree_reference`) their stored log-probs. Rows rebuilt from stores made
    before token ids were kept are tokenised from their text, and have no
    reference log-probs."""
    from csr.engine.train.dpo_data import PreferenceExample, completion_ids

    tokenizer = None
    examples = []
    for r in rows:
        chosen, rejected = r["chosen_token_ids"], r["rejected_token_ids"]
        tree = chosen is not None and rejected is not None
        if not tree:
            if tokenizer is None:
                from transformers import AutoTokenizer

                tokenizer = AutoTokenizer.from_pretrained(policy_path)
            chosen = chosen if chosen is not None else completion_ids(tokenizer, r["chosen_text"])
            rejected = rejected if rejected is not None else completion_ids(tokenizer, r["rejected_text"])
        examples.append(
            PreferenceExample(
                image_path=str(Path(r["image_root"]) / r["image_path"]),
                prompt=r["prompt"],
                chosen_ids=list(chosen),
                rejected_ids=list(rejected),
                chosen_ref_logp=r["chosen_logprob_sum"] if tree and tree_reference else None,
                rejected_ref_logp=r["rejected_logprob_sum"] if tree and tree_reference else None,
                prompt_template=prompt_template,
            )
        )
    return examples
