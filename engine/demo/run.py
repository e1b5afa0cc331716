"""`csr demo`: the whole CSR loop on the built-in shapes world, on a CPU.

Builds the world and its tiny models (cached under the study directory),
creates a SQLite store, imports the prompts, then runs generate -> curate ->
train for each iteration and evaluates every model version with CHAIR and
POPE on held-out images (the scenes' objects are the annotations), with 95 %
bootstrap intervals. Everything goes through the same code a real study uses.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from csr.engine.errors import CsrError
from csr.engine.evaluate import pope
from csr.engine.evaluate.benchmarks import ChairTask, PopeTask, evaluate_versions
from csr.engine.evaluate.chair import world_vocabulary
from csr.engine.generate import GenerateRequest, generate_iteration
from csr.engine.io.importing import import_prompts
from csr.engine.io.pair_import import import_pairs
from csr.engine.iterations import TrainOptions
from csr.engine.iterations import train as train_version
from csr.engine.pipeline import run_iteration
from csr.engine.rewards import Preset, check_preset
from csr.engine.settings import Settings, load_settings
from csr.engine.worker_loop import WorkerOptions
from csr.storage import Store

DATASET = "demo-world-heldout"
# The world's longest caption is 4 sentences of 6 tokens; 64 new tokens never
# cut one short (real data: evaluation.CHAIR_MAX_NEW_TOKENS).
DEMO_EVAL_MAX_NEW_TOKENS = 64
DEMO_FILE = "demo.json"  # the world options of the run a demo directory holds

# Search and training sized for a 2-core CPU: the world's sentences are ~6
# tokens, so short token searches lose nothing; DPO on a 0.4M-parameter model
# needs a far larger step than the paper's 1e-7 for a 7B model. Pure DPO on the
# world's pairs (which differ in a colour or shape word) lowered the chosen
# responses' likelihood with the rejected ones and raised hallucination; an NLL
# term on the chosen response (sft_weight) and 1,000 prompts per iteration made
# CSR reduce it (docs/demo-results.md).
DEMO_GENERATE = {
    "num_token_beams": 3,
    "num_beam_groups": 3,
    "diversity_penalty": 3.0,
    "max_new_tokens": 12,
    "max_length": 64,
    "num_beams": 2,
    "preset": Preset.paper,
    "lam": 0.9,
}
# The self-rewarding baseline in the demo: the tiny policy writes only the
# world's words and cannot answer "response 1", so its verdicts are read from
# the first two shape words (run_demo fills them in): a judge no better than
# its model, which is what self-rewarding has without a capable judge.
DEMO_SELF_REWARD = {"max_new_tokens": 64, "judge_max_new_tokens": 16}
DEMO_TRAIN = {
    "beta": 0.1,
    "sft_weight": 1.0,
    "lora_r": 16,
    "lora_alpha": 32,
    "lora_dropout": 0.0,
    "learning_rate": 5e-4,
    "projector_learning_rate": 5e-4,
    "epochs": 1,
    "batch_size": 8,
    "warmup_ratio": 0.0,
    "save_steps": 1000,
    "gradient_checkpointing": False,
}


class DemoMethod(StrEnum):
    """How each demo iteration makes its pairs: the two generate methods, or
    pairs made from the world's ground truth and imported as `csr pairs import`
    does (the stand-in for preference data from elsewhere)."""

    csr = "csr"
    self_reward = "self-reward"
    truth_pairs = "truth-pairs"


@dataclass(frozen=True)
class DemoOptions:
    directory: Path
    iterations: int = 3
    prompts: int = 1000
    heldout: int = 1000
    seed: int = 0
    lambda_weight: float = 0.9  # the weight of R_I; recorded as [generate] lam
    size: str = "default"  # demo model recipe: default | quick
    device: str = "cpu"  # where generation and training run; the tiny models train on the CPU
    # The tiny models learn from other scenes than CSR's prompts: a policy
    # trained on its own prompt images memorises them and leaves CSR almost no
    # hallucination to correct (docs/demo-world.md).
    model_scenes: int = 2000
    generate: dict = field(default_factory=dict)
    train: dict = field(default_factory=dict)
    # How each iteration makes pairs (DemoMethod); self-reward takes [self_reward] settings on top of DEMO_SELF_REWARD.
    method: str = DemoMethod.csr
    self_reward: dict = field(default_factory=dict)


@dataclass
class VersionRow:
    version: int
    chair_s: float
    chair_i: float
    recall: float
    mean_words: float
    chair_s_ci: tuple[float, float]
    chair_i_ci: tuple[float, float]
    pope: dict[str, dict]  # setting -> accuracy, precision, recall, f1, yes_ratio, f1_ci, ...
    chosen_r_i: float | None = None
    rejected_r_i: float | None = None
    pairs: int | None = None


@dataclass
class DemoReport:
    rows: list[VersionRow]
    wall_seconds: float
    store_url: str
    # The iteration whose pair set was empty (the method made no preference): the
    # demo stops there, and version N-1 stays the method's model.
    empty_iteration: int | None = None


def train_base_models(model_scenes, models: Path, seed: int, size: str) -> tuple[Path, Path]:
    """The demo's base policy and reward CLIP under `models` (base/, clip/), reused
    when their manifest matches. `bench/compare_methods.py` trains a seed's once here."""
    from csr.engine.demo.clip import train_demo_clip
    from csr.engine.demo.models import train_demo_policy

    return (train_demo_policy(model_scenes, models / "base", seed=seed, size=size),
            train_demo_clip(model_scenes, models / "clip", seed=seed, size=size))


def run_demo(options: DemoOptions, say: Callable[[str], None] = print) -> DemoReport:
    from csr.engine.demo.world import WorldConfig, generate_scenes, write_prompt_set

    started = time.perf_counter()
    root = options.directory.resolve()
    generate = {**DEMO_GENERATE, "lam": options.lambda_weight, **options.generate}
    train = {**DEMO_TRAIN, "seed": options.seed, **options.train}
    world_options = {"seed": options.seed, "prompts": options.prompts, "model_scenes": options.model_scenes,
                     "heldout": options.heldout, "size": options.size}
    method = DemoMethod(options.method)
    if method is DemoMethod.truth_pairs:
        world_options["method"] = method.value  # a directory holds one method's versions
    try:
        check_preset(generate["preset"])
    except ValueError as exc:
        raise CsrError(str(exc)) from None
    _refuse_other_settings(root, generate, train, world_options)
    root.mkdir(parents=True, exist_ok=True)
    (root / DEMO_FILE).write_text(json.dumps(world_options, indent=1, sort_keys=True) + "\n")
    world = WorldConfig(seed=options.seed)
    model_scenes = generate_scenes(world, options.model_scenes, "train")
    prompt_scenes = generate_scenes(world, options.prompts, "train", start=options.model_scenes)
    heldout = generate_scenes(world, options.heldout, "heldout")
    prompt_file = write_prompt_set(prompt_scenes, root / "world")
    say(f"world: {len(prompt_scenes)} CSR prompts, {len(heldout)} held-out images under {root / 'world'}; "
        f"the tiny models learn from {len(model_scenes)} other scenes")

    t = time.perf_counter()
    policy_dir, clip_dir = train_base_models(model_scenes, root / "models", options.seed, options.size)
    say(f"tiny models ready in {time.perf_counter() - t:.1f} s (cached under {root / 'models'})")

    settings = Settings(
        path=root / "csr.toml",
        store_url=f"sqlite:///{root / 'csr.db'}",
        model=str(policy_dir),
        clip=f"local-dir:{clip_dir}",
        clip_pretrained=None,
        models_dir="models",
        generate=generate,
        train=train,
        self_reward={**DEMO_SELF_REWARD, "judge_answers": list(world.shapes[:2]), **options.self_reward},
    )
    settings.write()
    store, _ = Store.create(settings.store_url)
    with store:
        store.register_base_model(settings.model, settings.clip, settings.clip_pretrained)
        report = import_prompts(store, prompt_file, prompt_file.parent / "images")
        say(f"store {settings.store_url}: {report.added} prompt(s) imported, {report.already_present} already there")

        chair_task, pope_task = demo_tasks(heldout, world.object_names, options.seed)

        def evaluate_version(version: int) -> VersionRow:
            outcomes = evaluate_versions(store, [version], [chair_task, pope_task], device=options.device,
                                         batch_size=64)
            chair_m, pope_m = outcomes[0].metrics, outcomes[1].metrics
            return VersionRow(version, chair_m["chair_s"], chair_m["chair_i"], chair_m["recall"],
                              chair_m["mean_words"], tuple(chair_m["ci"]["chair_s"]),
                              tuple(chair_m["ci"]["chair_i"]), pope_m)

        def generate_in_process(number: int) -> None:
            t = time.perf_counter()
            request = GenerateRequest(
                iteration=number, method=options.method, search_settings=settings.generate,
                self_reward_settings=settings.self_reward, settings_source=str(settings.path),
                devices=(options.device,), options=WorkerOptions(device=options.device, batch_prompts=8),
            )
            done = generate_iteration(store, settings.store_url, request)
            if done.stopped_by is not None:
                raise KeyboardInterrupt
            say(f"iteration {number}: generated {done.prompts_done} prompt(s), {done.candidates} candidate(s) "
                f"in {time.perf_counter() - t:.1f} s")

        def train_on_truth_pairs(number: int) -> tuple[int, int, float | None]:
            """Iteration N trains on pairs made from the prompt scenes' ground truth (a
            fresh hallucination per scene and iteration), imported as `csr pairs import`
            does. Returns (pairs, pair set id, training seconds or None when kept)."""
            from csr.engine.demo.truth_pairs import write_truth_pairs

            name = f"truth-{number}"
            pair_file = write_truth_pairs(prompt_scenes, root / "world" / f"{name}.jsonl",
                                          seed=options.seed * 1000 + number)
            imported = import_pairs(store, pair_file, prompt_file.parent / "images", name)  # idempotent
            if store.model_version(number) is not None:
                return imported.pairs, imported.pair_set_id, None
            trained = train_version(store, settings, number, TrainOptions(device=options.device, pair_set=name))
            return imported.pairs, imported.pair_set_id, trained.train_seconds

        def run_one(number: int) -> tuple[int, int, float | None]:
            if method is DemoMethod.truth_pairs:
                return train_on_truth_pairs(number)
            done = run_iteration(store, settings, number, generate_in_process, TrainOptions(device=options.device),
                                 stop_when_empty=True)
            return done.curated.pairs, done.curated.pair_set_id, None if done.trained is None else done.trained.train_seconds

        rows, empty = [evaluate_version(0)], None
        say(_row_line(rows[-1]))
        for number in range(1, options.iterations + 1):
            pairs, pair_set_id, train_seconds = run_one(number)
            if pairs == 0:
                empty = number
                say(f"iteration {number}: no pairs, nothing to train on: the demo stops, version {number - 1} "
                    "stays this method's model")
                break
            if train_seconds is None:
                say(f"iteration {number}: {pairs} pair(s); model version {number} exists, kept")
            else:
                say(f"iteration {number}: {pairs} pair(s); trained version {number} in {train_seconds:.1f} s")
            row = evaluate_version(number)
            row.pairs = pairs
            # the paper's figure 5 quantity (none for imported pairs: no tree)
            row.chosen_r_i, row.rejected_r_i = store.pair_clip_means(pair_set_id)
            rows.append(row)
            say(_row_line(row))
    return DemoReport(rows=rows, wall_seconds=time.perf_counter() - started, store_url=settings.store_url,
                      empty_iteration=empty)





def demo_tasks(heldout, object_names, seed: int) -> tuple[ChairTask, PopeTask]:
    """CHAIR and POPE on the held-out scenes. POPE asks about the scenes with
    3 or more objects; the captioner answers through its description."""
    chair_task = ChairTask(
        dataset=DATASET, keys=[s.id for s in heldout], images=[s.render() for s in heldout],
        prompts=[s.prompt for s in heldout], truths=[s.truth for s in heldout],
        vocabulary=world_vocabulary(object_names), max_new_tokens=DEMO_EVAL_MAX_NEW_TOKENS,
        bootstrap_seed=seed,
    )
    objects = {s.id: s.truth for s in heldout}
    chosen = pope.sample_images(objects, seed, n_images=len(heldout))
    questions = [q for setting in pope.SETTINGS for q in pope.build_questions(objects, setting, seed, chosen)]
    pope_task = PopeTask(
        dataset=DATASET, questions=questions, images={}, bootstrap_seed=seed,
        answer_from="description", describe=chair_task, extra_settings={"question_seed": seed},
    )
    return chair_task, pope_task


def _refuse_other_settings(root: Path, generate: dict, train: dict, world_options: dict) -> None:
    """A demo directory resumes only the run it holds: checked before anything is written."""
    if not (root / "csr.toml").is_file() or not (root / DEMO_FILE).is_file():
        return
    held = load_settings(root / "csr.toml")
    held_world = json.loads((root / DEMO_FILE).read_text())
    sections = (("generate", held.generate, generate), ("train", held.train, train),
                ("demo", held_world, world_options))
    differing = sorted(
        f"{section}.{key}: {mine.get(key)!r} there, {theirs.get(key)!r} now"
        for section, mine, theirs in sections
        for key in set(mine) | set(theirs)
        if mine.get(key) != theirs.get(key)
    )
    if differing:
        raise CsrError(f"{root} holds a demo run with other settings ({'; '.join(differing)}): "
                       "pass another --dir, or the same settings to resume it")


def _row_line(row: VersionRow) -> str:
    extra = ""
    if row.chosen_r_i is not None:
        extra = f", R_I chosen {row.chosen_r_i:.2f} / rejected {row.rejected_r_i:.2f} over {row.pairs} pair(s)"
    f1 = ", ".join(f"{setting} {row.pope[setting]['f1']:.3f} [{row.pope[setting]['f1_ci'][0]:.3f}, "
                   f"{row.pope[setting]['f1_ci'][1]:.3f}]" for setting in pope.SETTINGS if setting in row.pope)
    return (f"model version {row.version}: CHAIR_S {row.chair_s:.3f} [{row.chair_s_ci[0]:.3f}, "
            f"{row.chair_s_ci[1]:.3f}], CHAIR_I {row.chair_i:.3f} [{row.chair_i_ci[0]:.3f}, {row.chair_i_ci[1]:.3f}], "
            f"recall {row.recall:.3f}, {row.mean_words:.1f} words; POPE F1 {f1}{extra}")
