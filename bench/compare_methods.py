"""The paper's comparison on the demo world: one table of methods
(docs/demo-results.md).

    python bench/compare_methods.py --seeds 0 1 2 3 4 --iterations 3 --prompts 1000 --heldout 1000 \
        --jobs 2 --out bench/out/compare.md

Every method runs the real `csr demo` for each seed in its own study
directory, from the same base models (trained once per seed and machine
before its first demo and copied; their cache manifest makes `csr demo`
reuse them) and judged on
the same held-out scenes: base (version 0), CSR with the paper's and the
released code's rules, the two reward ablations (R_T only, R_I only), the
self-rewarding baseline, and a pair set from elsewhere (the world's ground
truth, imported as `csr pairs import` does). The table gives each figure's
mean over seeds with a 95 % Student-t interval, and a paired t-test of CSR
(paper) against every other method at each version.

The whole comparison is 30 demos (3 iterations, 1,000 prompts, 1,000
held-out scenes; 1 to 10 minutes each, 78 minutes with two at a time on a
busy 2-core machine), so a finished run is kept in the repository
(bench/results/compare_methods/seed<S>-<method>.json: its figures, sizes
and the commit it ran on) and never run again at the same sizes: a stopped
or partial comparison resumes, on this machine or another, and the table is
built from the kept runs (`--table-only` builds it without running
anything). Base models trained again are identical run to run on one
machine (one thread, fixed seeds: `--rerun` checks it); another CPU may
differ in the last bits, and the table refuses runs of one seed that
disagree on version 0.

Every demo runs on one thread (the thread count changes the tiny models'
floating-point reduction order), so a seed's figures are reproducible:

    python bench/compare_methods.py --rerun 0

reruns every kept method of seed 0 at its kept sizes from scratch (base
models included) under ROOT/rerun and compares each figure with the kept
run's.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from csr.engine.evaluate.over_seeds import mean_interval, paired_t_test  # noqa: E402

# label -> `csr demo` options; the first one trains each seed's base models.
METHODS = {
    "CSR (paper)": ("--preset", "paper", "--lambda", "0.9"),
    "CSR (reference-code)": ("--preset", "reference-code", "--lambda", "0.9"),
    "R_T only (lambda 0)": ("--preset", "paper", "--lambda", "0"),
    "R_I only (lambda 1)": ("--preset", "paper", "--lambda", "1"),
    "self-rewarding": ("--method", "self-reward"),
    "outside pairs (ground truth)": ("--method", "truth-pairs"),
}
REFERENCE = "CSR (paper)"
SLUGS = {label: f"m{i}" for i, label in enumerate(METHODS)}
KEPT_NAMES = {"CSR (paper)": "csr-paper", "CSR (reference-code)": "csr-reference-code",
              "R_T only (lambda 0)": "rt-only", "R_I only (lambda 1)": "ri-only",
              "self-rewarding": "self-rewarding", "outside pairs (ground truth)": "outside-pairs"}
KEPT = Path(__file__).resolve().parent / "results" / "compare_methods"
POPE_SETTINGS = ("random", "popular", "adversarial")
# figure -> (reads one version's row, lower is better)
FIGURES = {
    "CHAIR_S": (lambda row: row["chair_s"], True),
    "CHAIR_I": (lambda row: row["chair_i"], True),
    "POPE F1": (lambda row: sum(row["pope"][s]["f1"] for s in POPE_SETTINGS) / len(POPE_SETTINGS), False),
}


def sizes(args) -> dict:
    return {"iterations": args.iterations, "prompts": args.prompts, "heldout": args.heldout,
            "model_scenes": args.model_scenes, "quick": bool(args.quick)}


def kept_path(label: str, seed: int, kept: Path) -> Path:
    return kept / f"seed{seed}-{KEPT_NAMES[label]}.json"


def kept_result(label: str, seed: int, args) -> dict | None:
    """A finished run of this method and seed at these sizes, from any machine."""
    path = kept_path(label, seed, args.kept)
    if not path.is_file():
        return None
    result = json.loads(path.read_text())
    return result if result.get("sizes") == sizes(args) else None


def keep(label: str, seed: int, args, result: dict) -> dict:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parent).stdout.strip() or "unknown"
    result = {**result, "label": label, "sizes": sizes(args), "commit": commit,
              "finished": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    args.kept.mkdir(parents=True, exist_ok=True)
    kept_path(label, seed, args.kept).write_text(json.dumps(result, indent=1) + "\n")
    return result


def run(label: str, seed: int, args, root: Path | None = None, reuse: bool = True) -> dict:
    if reuse and (kept := kept_result(label, seed, args)) is not None:
        return kept
    root = root or args.root
    study = root / f"seed{seed}-{SLUGS[label]}"
    out = study / "results.json"
    models = train_base_models(seed, args, root)
    if label != REFERENCE and not (study / "models").exists():
        study.mkdir(parents=True, exist_ok=True)
        for name in ("base", "clip"):
            shutil.copytree(models / name, study / "models" / name)
    csr = Path(sys.executable).with_name("csr")
    cmd = [str(csr), "demo", "--dir", str(study), "--seed", str(seed), "--iter", f"1-{args.iterations}",
           "--prompts", str(args.prompts), "--heldout", str(args.heldout), "--model-scenes", str(args.model_scenes),
           *METHODS[label], "--out", str(out)]
    if args.quick:
        cmd.append("--quick")
    print(" ".join(cmd), flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    log_path = study.parent / f"seed{seed}-{SLUGS[label]}.log"
    study.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        done = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    if done.returncode != 0:  # a method that cannot run on a seed is reported, not fatal to the others
        lines = log_path.read_text().strip().splitlines()
        return {"failed": lines[-1] if lines else f"exit {done.returncode}"}
    result = json.loads(out.read_text())
    return keep(label, seed, args, result) if reuse else result


# In a process of its own: one thread, as `csr demo` trains them.
_BASE_MODELS = """
import sys
from pathlib import Path
from csr.engine.demo.run import train_base_models
from csr.engine.demo.world import WorldConfig, generate_scenes
seed, scenes, size, models = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], Path(sys.argv[4])
train_base_models(generate_scenes(WorldConfig(seed=seed), scenes, "train"), models, seed, size)
"""


_BASE_LOCKS: dict[tuple[Path, int], threading.Lock] = defaultdict(threading.Lock)


def train_base_models(seed: int, args, root: Path) -> Path:
    """The seed's base models, trained once on this machine as `csr demo` trains them
    (the demo then reuses them through their manifest); every method of the seed copies them."""
    models = root / f"seed{seed}-{SLUGS[REFERENCE]}" / "models"
    with _BASE_LOCKS[(root, seed)]:
        if not (models / "base").is_dir():
            print(f"seed {seed}: training the base models under {models}", flush=True)
            subprocess.run([sys.executable, "-c", _BASE_MODELS, str(seed), str(args.model_scenes),
                            "quick" if args.quick else "default", str(models)],
                           check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return models


def run_all(args) -> dict[tuple[str, int], dict]:
    """Seed by seed, every method of a seed (its base models trained once, first)."""
    args.root.mkdir(parents=True, exist_ok=True)
    jobs = [(label, seed) for seed in args.seeds for label in METHODS if label in args.methods]
    if args.table_only:
        return {job: kept_result(*job, args) or {"failed": "not run yet"} for job in jobs}
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        return dict(zip(jobs, pool.map(lambda job: run(*job, args), jobs), strict=True))


def rerun(args) -> int:
    """Every kept method of one seed (of --methods) again, from scratch (base models included),
    against its kept figures."""
    seed, fresh = args.rerun, args.root / "rerun"
    if fresh.exists():
        shutil.rmtree(fresh)
    reference = kept_path(REFERENCE, seed, args.kept)
    if not reference.is_file():
        raise SystemExit(f"no kept run of {REFERENCE} for seed {seed} in {args.kept}")
    for name, value in json.loads(reference.read_text())["sizes"].items():
        setattr(args, name, value)
    labels = [label for label in METHODS if label in args.methods and kept_result(label, seed, args) is not None]
    worst = 0.0
    for label in labels:
        stored = kept_result(label, seed, args)
        again = run(label, seed, args, fresh, reuse=False)
        if "failed" in again:
            print(f"{label}: the rerun failed: {again['failed']}")
            return 1
        differ = 0
        for version in range(args.iterations + 1):
            for name, (get, _) in FIGURES.items():
                a, b = get(_row(stored, version)), get(_row(again, version))
                worst = max(worst, abs(a - b))
                if a != b:
                    differ += 1
                    print(f"{label}, version {version}, {name}: kept {a!r}, rerun {b!r}")
        print(f"{label}: {'identical' if not differ else f'{differ} figure(s) differ'} "
              f"({(args.iterations + 1) * len(FIGURES)} figures)", flush=True)
    print(f"seed {seed}: {len(labels)} method(s) rerun; largest difference {worst:.3g}")
    return 0 if worst == 0.0 else 1


def _row(result: dict, version: int) -> dict:
    """A method that made no pairs at iteration k kept version k-1 (the demo stopped
    there): that version's figures stand for it at k and later."""
    rows = {v["version"]: v for v in result["versions"]}
    if version not in rows and result.get("empty_iteration") is not None and version >= result["empty_iteration"]:
        return rows[result["empty_iteration"] - 1]
    return rows[version]


def _carried(results: dict, label: str, seeds: list[int], version: int) -> list[int]:
    """The seeds on which `label` had no pairs by `version` (its figures are an earlier version's)."""
    return [s for s in seeds if (results[(label, s)].get("empty_iteration") or version + 1) <= version]


def empty_notes(results: dict) -> list[str]:
    return [f"- {label}, seed {seed}: no pairs at iteration {r['empty_iteration']}; version "
            f"{r['empty_iteration'] - 1} stands for the later versions" for (label, seed), r in results.items()
            if "failed" not in r and r.get("empty_iteration") is not None]


def _check_same_base(results: dict, seeds: list[int]) -> None:
    """Version 0 is the same model on the same scenes in every run of a seed."""
    for seed in seeds:
        bases = {json.dumps([_row(r, 0)["chair_s"], _row(r, 0)["chair_i"]]) for (_, s), r in results.items()
                 if s == seed and "failed" not in r}
        if len(bases) != 1:
            raise SystemExit(f"seed {seed}: the runs disagree on version 0 ({bases}): not the same base models")


def failures(results: dict) -> list[str]:
    return [f"- {label}, seed {seed}: {r['failed']}" for (label, seed), r in results.items() if "failed" in r]


def table(results: dict, seeds: list[int], iterations: int) -> str:
    labels = [label for label in METHODS
              if all((label, s) in results and "failed" not in results[(label, s)] for s in seeds)]
    head = "| method | version | " + " | ".join(f"{name} [95% CI]" for name in FIGURES) + " |"
    lines = [head, "|---" * (2 + len(FIGURES)) + "|"]
    first = results[(REFERENCE, seeds[0])] if (REFERENCE, seeds[0]) in results else None
    if first is not None:  # base: version 0, shared by every method of a seed
        lines.append("| base | 0 | " + " | ".join(
            _cell([get(_row(results[(REFERENCE, s)], 0)) for s in seeds]) for get, _ in FIGURES.values()) + " |")
    for label in labels:
        for version in range(1, iterations + 1):
            mark = " (kept, see below)" if _carried(results, label, seeds, version) else ""
            lines.append(f"| {label}{mark} | {version} | " + " | ".join(
                _cell([get(_row(results[(label, s)], version)) for s in seeds]) for get, _ in FIGURES.values()) + " |")
    lines += ["", f"Paired t-test over {len(seeds)} seed(s), {REFERENCE} minus the other method at the same "
              "version (mean difference [95% CI], two-sided p); for CHAIR a negative difference favours CSR, "
              "for POPE F1 a positive one:", "",
              "| other method | version | " + " | ".join(FIGURES) + " |", "|---" * (2 + len(FIGURES)) + "|"]
    if REFERENCE in labels:
        for label in labels:
            if label == REFERENCE:
                continue
            for version in range(1, iterations + 1):
                cells = []
                for get, _ in FIGURES.values():
                    ours = [get(_row(results[(REFERENCE, s)], version)) for s in seeds]
                    theirs = [get(_row(results[(label, s)], version)) for s in seeds]
                    test = paired_t_test(ours, theirs)
                    cells.append(f"{test.difference:+.3f} [{test.low:+.3f}, {test.high:+.3f}], p {test.p_value:.3f}")
                lines.append(f"| {label} | {version} | " + " | ".join(cells) + " |")
        for version in range(1, iterations + 1):  # CSR against the model it started from
            cells = []
            for get, _ in FIGURES.values():
                test = paired_t_test([get(_row(results[(REFERENCE, s)], version)) for s in seeds],
                                     [get(_row(results[(REFERENCE, s)], 0)) for s in seeds])
                cells.append(f"{test.difference:+.3f} [{test.low:+.3f}, {test.high:+.3f}], p {test.p_value:.3f}")
            lines.append(f"| base (version 0) | {version} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cell(values: list[float]) -> str:
    m = mean_interval(values)
    return f"{m.mean:.3f} [{m.low:.3f}, {m.high:.3f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=1000)
    parser.add_argument("--heldout", type=int, default=1000)
    parser.add_argument("--model-scenes", type=int, default=2000, help="scenes the base models learn from")
    parser.add_argument("--quick", action="store_true", help="the demo's smaller models (a fast check)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS), metavar="LABEL",
                        help=f"which methods to run ({REFERENCE}, the one the others are tested against, always runs)")
    parser.add_argument("--jobs", type=int, default=1, help="demos run at once (each on one thread)")
    parser.add_argument("--root", type=Path, default=Path("bench/out/compare"), help="the demos' study directories")
    parser.add_argument("--kept", type=Path, default=KEPT, help="finished runs, kept in the repository")
    parser.add_argument("--table-only", action="store_true", help="build the table from the kept runs; run nothing")
    parser.add_argument("--out", type=Path, default=None, help="write the markdown tables here")
    parser.add_argument("--rerun", type=int, metavar="SEED", default=None,
                        help="rerun every kept method of SEED (of --methods) from scratch and compare the figures")
    args = parser.parse_args()
    if args.rerun is not None:
        raise SystemExit(rerun(args))
    args.methods = set(args.methods) | {REFERENCE}
    started = time.perf_counter()
    results = run_all(args)
    seeds = args.seeds
    if args.table_only:  # the seeds whose reference run is kept
        seeds = [s for s in args.seeds if "failed" not in results[(REFERENCE, s)]]
        if not seeds:
            raise SystemExit(f"no kept run of {REFERENCE} at these sizes in {args.kept}")
        results = {key: r for key, r in results.items() if key[1] in seeds}
    absent = [f"- seed {s}: no kept run of {REFERENCE}" for s in args.seeds if s not in seeds]
    _check_same_base(results, seeds)
    if any("failed" in results[(REFERENCE, s)] for s in seeds):
        raise SystemExit("\n".join(["the reference method failed:", *failures(results)]))
    done = [r for r in results.values() if "failed" not in r]
    walls = [r["wall_seconds"] for r in done]
    commits = sorted({r.get("commit", "?") for r in done})
    text = (f"{len(seeds)} seed(s) ({', '.join(map(str, seeds))}), {args.prompts} prompts, "
            f"{args.heldout} held-out scenes, {args.iterations} iteration(s)"
            f"{', quick models' if args.quick else ''}; one demo {min(walls):.0f} to {max(walls):.0f} s; "
            f"run on commit(s) {', '.join(commits)}\n\n"
            + table(results, seeds, args.iterations)
            + ("\n\nKept a version (no pairs):\n" + "\n".join(empty_notes(results)) if empty_notes(results) else "")
            + ("\n\nNot in the table:\n" + "\n".join(absent + failures(results)) if absent or failures(results)
               else ""))
    print(text)
    print(f"total wall time {time.perf_counter() - started:.0f} s")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
