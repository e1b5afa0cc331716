"""The demo-world experiment of docs/demo-results.md: CHAIR per iteration for
CSR (lambda 0.9) against the ablations lambda 0 (R_T only) and lambda 1 (R_I
only), on the same world and seeds, averaged over seeds.

    python bench/demo_ablation.py --seeds 0 1 2 --iterations 3 --jobs 2 --out bench/out/ablation.md

Each (seed, lambda) runs the real `csr demo` in its own study directory; the
tiny models of a seed are trained once (by its lambda 0.9 run) and copied
(their cache manifest makes `csr demo` reuse them). With --jobs N, N demos run
at once, each with one intra-op thread.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

LAMBDAS = (0.9, 0.0, 1.0)


def run(seed: int, lam: float, args, root: Path) -> dict:
    study = root / f"seed{seed}-lambda{lam:g}"
    models = root / f"seed{seed}-lambda{LAMBDAS[0]:g}" / "models"
    if lam != LAMBDAS[0] and models.exists() and not (study / "models").exists():
        study.mkdir(parents=True, exist_ok=True)
        for name in ("base", "clip"):
            shutil.copytree(models / name, study / "models" / name)
    out = study / "results.json"
    csr = Path(sys.executable).with_name("csr")
    cmd = [str(csr), "demo", "--dir", str(study), "--seed", str(seed), "--lambda", str(lam),
           "--iter", f"1-{args.iterations}", "--prompts", str(args.prompts), "--heldout", str(args.heldout),
           "--preset", args.preset, "--out", str(out)]
    print(" ".join(cmd), flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"} if args.jobs > 1 else None
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL if args.jobs > 1 else None)
    return json.loads(out.read_text())


def run_all(args) -> list[dict]:
    """Each seed's lambda 0.9 run first (it trains the seed's models), then the ablations."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        first = list(pool.map(lambda seed: run(seed, LAMBDAS[0], args, args.root), args.seeds))
        rest = list(pool.map(lambda job: run(*job, args, args.root),
                             [(seed, lam) for seed in args.seeds for lam in LAMBDAS[1:] if lam in args.lambdas]))
    return first + rest


def _cell(rows: list[dict], key: str) -> str:
    values = [row[key] for row in rows]
    return f"{statistics.mean(values):.3f} ({', '.join(f'{v:.3f}' for v in values)})"


def table(results: list[dict], iterations: int) -> str:
    lines = ["| lambda | version | CHAIR_S mean (per seed) | CHAIR_I mean (per seed) | recall mean | words mean |",
             "|---|---|---|---|---|---|"]
    for lam in LAMBDAS:
        runs = [r for r in results if r["lambda"] == lam]
        if not runs:
            continue
        for version in range(iterations + 1):
            rows = [next(v for v in r["versions"] if v["version"] == version) for r in runs]
            lines.append(f"| {lam:g} | {version} | {_cell(rows, 'chair_s')} | {_cell(rows, 'chair_i')} | "
                         f"{statistics.mean(row['recall'] for row in rows):.3f} | "
                         f"{statistics.mean(row['mean_words'] for row in rows):.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=1000)
    parser.add_argument("--heldout", type=int, default=100)
    parser.add_argument("--preset", default="paper", help="reward preset of every run (paper, reference-code)")
    parser.add_argument("--jobs", type=int, default=1, help="demos run at once (one thread each when > 1)")
    parser.add_argument("--lambdas", type=float, nargs="+", default=list(LAMBDAS),
                        help="which of 0.9 (always run: it trains each seed's models), 0 and 1 to run")
    parser.add_argument("--root", type=Path, default=Path("bench/out/ablation"))
    parser.add_argument("--out", type=Path, default=None, help="Write the markdown table here.")
    args = parser.parse_args()
    started = time.perf_counter()
    results = run_all(args)
    text = table(results, args.iterations)
    print(text)
    print(f"total wall time {time.perf_counter() - started:.0f} s")
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
