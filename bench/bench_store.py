"""Store benchmark: candidate insert rate and the `csr stats` aggregate, at paper scale.

    python bench/bench_store.py                 # 13,000 prompts x 200 candidates = 2.6 M rows
    python bench/bench_store.py --prompts 1000  # a quicker run
    python bench/bench_store.py study --help    # every command at a study's size (bench/store_at_size.py)

Measured in one run, on temporary SQLite files made by `create_store` (same
schema, indexes and pragmas as a real store):

(a) rows/s through the store API (`insert_candidates`, one transaction per
    prompt tree, the way generation workers write) against a raw
    `sqlite3.executemany` of the same rows into other files, once in one
    transaction and once with one transaction per tree; the ratio is taken
    against the faster of the two;
(b) the candidate aggregates of `csr stats`, and the `responses` recursion
    (mean words of final responses), run by SQLite itself against DuckDB,
    both over the live attached store and through `--cache` (a columnar copy
    of the candidates in a DuckDB file, synced at connect);
(c) what keeping that cache up to date costs.
"""

from __future__ import annotations

import argparse
import random
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import insert

from csr.storage import analytics, analytics_figures
from csr.storage.db import SQLITE_BUSY_TIMEOUT_MS
from csr.storage.models import Image, Iteration, ModelVersion, Prompt
from csr.storage.store import create_store
from csr.storage.trees import CANDIDATE_COLUMNS, insert_candidates

NOW = datetime(2025, 1, 1, tzinfo=UTC).replace(tzinfo=None)  # the store keeps naive UTC
VOCABULARY = ("the", "a", "cat", "dog", "red", "blue", "sits", "on", "mat", "near", "window", "small",
              "large", "image", "shows", "wooden", "table", "with", "two", "people", "standing", "street")
# Candidates per search step: 5 token beams from the prompt, then 5 x 5 per step.
LEVELS = (5, 25, 25, 25, 25, 25, 25, 25, 20)
EXCLUSIONS = ("repeated_word", "too_short", "non_latin", "too_many_newlines")

# The same aggregate SQL for both engines: the candidate-level figures of
# `csr stats` (booleans are integers in SQLite and BOOLEAN in the DuckDB views,
# and `WHERE is_final` reads right on both).
AGGREGATES = (
    analytics_figures._CANDIDATE_STATS.format(where=""),
    analytics_figures._EXCLUSIONS.format(and_where=""),
)
RESPONSE_WORDS_SQLITE = """
WITH RECURSIVE path(leaf_id, iteration, prompt_id, parent_node, text) AS (
  SELECT id, iteration, prompt_id, parent_node, text FROM candidates WHERE is_final
  UNION ALL
  SELECT path.leaf_id, path.iteration, path.prompt_id, c.parent_node, c.text
  FROM path JOIN candidates AS c
    ON c.iteration = path.iteration AND c.prompt_id = path.prompt_id AND c.node = path.parent_node
)
SELECT iteration, avg(words) FROM (
  SELECT iteration, leaf_id,
         sum(length(trim(text)) - length(replace(trim(text), ' ', '')) + 1) AS words
  FROM path GROUP BY iteration, leaf_id
) GROUP BY iteration
"""
# SQLite walks a tree both ways through an index (the unique node index up,
# ix_candidates_children down); the benchmark gives it the faster of the two.
RESPONSE_WORDS_SQLITE_TOP_DOWN = """
WITH RECURSIVE prefix(iteration, prompt_id, node, is_final, words) AS (
  SELECT iteration, prompt_id, node, is_final, length(trim(text)) - length(replace(trim(text), ' ', '')) + 1
  FROM candidates WHERE parent_node IS NULL
  UNION ALL
  SELECT c.iteration, c.prompt_id, c.node, c.is_final,
         prefix.words + length(trim(c.text)) - length(replace(trim(c.text), ' ', '')) + 1
  FROM prefix JOIN candidates AS c
    ON c.iteration = prefix.iteration AND c.prompt_id = prefix.prompt_id AND c.parent_node = prefix.node
)
SELECT iteration, avg(words) FROM prefix WHERE is_final GROUP BY iteration
"""
RESPONSE_WORDS_DUCKDB = analytics_figures._RESPONSE_LENGTH.format(where="")


def tree_rows(rng: random.Random, sentences: list[str], levels: tuple[int, ...] = LEVELS) -> list[dict]:
    """One prompt's search tree in the shape of the paper's search (200 candidates)."""
    rows: list[dict] = []
    kept: list[dict] = []
    for depth, size in enumerate(levels):
        level = []
        for sibling in range(size):
            parent = kept[sibling % len(kept)] if kept else None
            logprob = -rng.random() * 8.0
            r_t = 2.718281828459045 ** logprob
            r_i = rng.random() * 35.0
            reward = 0.9 * r_i + 0.1 * r_t
            excluded = rng.random() < 0.05
            last = depth == len(levels) - 1
            row = {
                "node": len(rows),
                "parent_node": parent["node"] if parent else None,
                "depth": depth,
                "sibling_index": sibling,
                "text": rng.choice(sentences),
                "token_count": rng.randint(6, 30),
                "logprob_sum": logprob,
                "r_t": r_t,
                "r_i": r_i,
                "reward": reward,
                "cumulative_reward": reward + (parent["cumulative_reward"] if parent else 0.0),
                "is_final": not excluded and (last or rng.random() < 0.08),
                "is_kept": False,
                "exclusion_reason": rng.choice(EXCLUSIONS) if excluded else None,
                "finish_reason": "eos" if last else "sentence_end",
            }
            rows.append(row)
            level.append(row)
        live = sorted((r for r in level if not r["is_final"] and r["exclusion_reason"] is None),
                      key=lambda r: r["cumulative_reward"])
        kept = live[:5] + live[-5:] if len(live) > 10 else live
        for row in kept:
            row["is_kept"] = True
        if not kept:
            break
    return rows


def sentence_pool(rng: random.Random, size: int = 5000) -> list[str]:
    return [" ".join(rng.choice(VOCABULARY) for _ in range(rng.randint(6, 22))).capitalize() + "."
            for _ in range(size)]


def trees(prompts: int, seed: int) -> Iterator[tuple[int, list[dict]]]:
    rng = random.Random(seed)
    sentences = sentence_pool(rng)
    for prompt_id in range(1, prompts + 1):
        yield prompt_id, tree_rows(rng, sentences)


def prepare_store(path: Path, prompts: int) -> str:
    """A store with prompts, a base model and iteration 1, ready for candidates."""
    url = f"sqlite:///{path}"
    engine, _ = create_store(url)
    with engine.begin() as conn:
        conn.execute(insert(Image), [{"sha256": f"{i:064x}", "root": "/images", "rel_path": f"{i}.jpg",
                                      "size_bytes": 1, "width": 336, "height": 336} for i in range(1, prompts + 1)])
        conn.execute(insert(Prompt), [{"external_id": f"p{i}", "image_id": i, "text": "Describe the image.",
                                       "source": "bench", "created_at": NOW} for i in range(1, prompts + 1)])
        conn.execute(insert(ModelVersion).values(version=0, path="base", base_model="base", clip_model="clip",
                                                 created_at=NOW))
        conn.execute(insert(Iteration).values(number=1, policy_version=0, preset="paper", config={},
                                              config_hash="0" * 64, state="generating", created_at=NOW))
    engine.dispose()
    return url


def bench_store_api(url: str, prompts: int, seed: int) -> tuple[int, float]:
    from csr.storage.db import make_engine

    engine = make_engine(url)
    rows = 0
    elapsed = 0.0
    for prompt_id, tree in trees(prompts, seed):
        start = time.perf_counter()
        with engine.begin() as conn:
            rows += insert_candidates(conn, 1, prompt_id, tree)
        elapsed += time.perf_counter() - start
    engine.dispose()
    return rows, elapsed


def bench_raw(path: Path, prompts: int, seed: int, *, per_tree: bool) -> tuple[int, float]:
    """sqlite3.executemany of the same rows: one transaction, or one per tree like the API."""
    columns = ("iteration", "prompt_id", *CANDIDATE_COLUMNS)
    sql = f"INSERT INTO candidates ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})"
    batches = [[(1, prompt_id, *(row[c] for c in CANDIDATE_COLUMNS)) for row in tree]
               for prompt_id, tree in trees(prompts, seed)]
    if not per_tree:
        batches = [[row for batch in batches for row in batch]]
    conn = sqlite3.connect(path, isolation_level=None)
    # The store engine's pragmas, so that only the API's own cost differs.
    for pragma in ("journal_mode=WAL", f"busy_timeout={SQLITE_BUSY_TIMEOUT_MS}", "foreign_keys=ON",
                   "synchronous=NORMAL"):
        conn.execute(f"PRAGMA {pragma}")
    start = time.perf_counter()
    for batch in batches:
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(sql, batch)
        conn.execute("COMMIT")
    elapsed = time.perf_counter() - start
    conn.close()
    return sum(len(batch) for batch in batches), elapsed


def timed(run: Callable[[], object], repeat: int) -> tuple[float, object]:
    """Median seconds of `repeat` runs after one warm-up run (page cache, statement caches)."""
    result = run()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


# (name, SQLite formulations (the fastest counts), DuckDB statements)
CASES = (
    ("csr stats candidate aggregates", (AGGREGATES,), AGGREGATES),
    ("mean words of final responses (recursive)",
     ((RESPONSE_WORDS_SQLITE,), (RESPONSE_WORDS_SQLITE_TOP_DOWN,)), (RESPONSE_WORDS_DUCKDB,)),
)


def bench_aggregates(path: Path, repeat: int, cache: Path | None) -> dict[str, tuple[float, object]]:
    """Seconds (and results) of each case through DuckDB, live attach or through the cache."""
    url = f"sqlite:///{path}"
    start = time.perf_counter()
    with analytics.connect(url, cache=cache) as duck:
        what = "cache sync + attach" if cache else "revision check, attach, views"
        print(f"  DuckDB connect ({what}): {time.perf_counter() - start:.3f} s")
        return {name: timed(lambda s=sqls: [sorted(duck.execute(q).fetchall()) for q in s], repeat)
                for name, _, sqls in CASES}


def bench_sqlite(path: Path, repeat: int) -> dict[str, tuple[float, object]]:
    lite = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    out = {}
    try:
        for name, variants, _ in CASES:
            runs = [timed(lambda s=sqls: [sorted(lite.execute(q).fetchall()) for q in s], repeat)
                    for sqls in variants]
            out[name] = min(runs, key=lambda run: run[0])
    finally:
        lite.close()
    return out


def _same(a: list, b: list) -> bool:
    """Results agree up to float rounding (the two engines sum in different orders)."""
    if len(a) != len(b):
        return False
    for rows_a, rows_b in zip(a, b, strict=True):
        if len(rows_a) != len(rows_b):
            return False
        for row_a, row_b in zip(rows_a, rows_b, strict=True):
            for x, y in zip(row_a, row_b, strict=True):
                if isinstance(x, float) or isinstance(y, float):
                    if abs(float(x) - float(y)) > 1e-9 * max(1.0, abs(float(x))):
                        return False
                elif x != y:
                    return False
    return True


def add_trees(url: str, first_prompt: int, count: int, seed: int) -> None:
    """Trees of a second iteration, as workers would add them while someone analyses."""
    from csr.storage.db import make_engine

    engine = make_engine(url)
    with engine.begin() as conn:
        if not conn.exec_driver_sql("SELECT 1 FROM iterations WHERE number = 2").first():
            conn.execute(insert(Iteration).values(number=2, policy_version=0, preset="paper", config={},
                                                  config_hash="0" * 64, state="generating", created_at=NOW))
    for offset, (_, tree) in enumerate(trees(count, seed + 1)):
        with engine.begin() as conn:
            insert_candidates(conn, 2, first_prompt + offset, tree)
    engine.dispose()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=13_000, help="prompt trees to write (200 candidates each)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeat", type=int, default=3, help="timed runs of each aggregate (median)")
    parser.add_argument("--dir", type=Path, default=None, help="where the store files go (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the store files")
    args = parser.parse_args(argv)

    directory = args.dir or Path(tempfile.mkdtemp(prefix="csr-bench-"))
    directory.mkdir(parents=True, exist_ok=True)
    paths = {name: directory / f"{name}.db" for name in ("api", "raw", "raw_trees")}
    cache = directory / "analytics.duckdb"
    for path in (*paths.values(), cache):
        for suffix in ("", "-wal", "-shm", ".wal"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)
    try:
        rows = args.prompts * sum(LEVELS)
        print(f"{args.prompts} prompts x {sum(LEVELS)} candidates = {rows:,} rows in {directory}")
        urls = {name: prepare_store(path, args.prompts) for name, path in paths.items()}

        print("(a) insert")
        api_rows, api_s = bench_store_api(urls["api"], args.prompts, args.seed)
        one_rows, one_s = bench_raw(paths["raw"], args.prompts, args.seed, per_tree=False)
        tree_rows_, tree_s = bench_raw(paths["raw_trees"], args.prompts, args.seed, per_tree=True)
        api_rate = api_rows / api_s
        raw_rates = {"1 transaction": one_rows / one_s, "1 transaction per tree": tree_rows_ / tree_s}
        print(f"  store API insert_candidates, 1 transaction per tree: {api_s:7.2f} s = {api_rate:9,.0f} rows/s")
        for name, rate in raw_rates.items():
            print(f"  raw sqlite3.executemany, {name + ':':24s}  {rows / rate:7.2f} s = {rate:9,.0f} rows/s")
        best = max(raw_rates.values())
        print(f"  ratio store API / fastest raw: {api_rate / best:.0%} (target >= 50%)")

        print(f"(b) aggregates over {rows:,} candidates (median of {args.repeat} runs after a warm-up)")
        sqlite = bench_sqlite(paths["api"], args.repeat)
        live = bench_aggregates(paths["api"], args.repeat, None)
        start = time.perf_counter()
        cached = bench_aggregates(paths["api"], args.repeat, cache)
        print(f"    (first use of the cache, copy included: {time.perf_counter() - start:.2f} s)")
        for name, _, _ in CASES:
            sqlite_s, expected = sqlite[name]
            for how, results in (("DuckDB live attach", live), ("DuckDB --cache", cached)):
                duck_s, got = results[name]
                note = "" if _same(expected, got) else "  (RESULTS DIFFER)"
                print(f"  {name}: SQLite {sqlite_s:.3f} s, {how} {duck_s:.3f} s = "
                      f"{sqlite_s / duck_s:.1f}x SQLite's speed{note}")

        print("(c) cache upkeep")
        start = time.perf_counter()
        with analytics.connect(urls["api"], cache=cache):
            pass
        print(f"  connect with an up-to-date cache: {time.perf_counter() - start:.2f} s")
        new = max(1, args.prompts // 100)
        add_trees(urls["api"], 1, new, args.seed)
        start = time.perf_counter()
        with analytics.connect(urls["api"], cache=cache) as duck:
            elapsed = time.perf_counter() - start
            (count,) = duck.execute("SELECT count(*) FROM candidates").fetchone()
        print(f"  connect after {new} new trees ({new * sum(LEVELS):,} rows): {elapsed:.2f} s; "
              f"cache holds {count:,} rows (expected {rows + new * sum(LEVELS):,})")
    finally:
        if not args.keep and args.dir is None:
            shutil.rmtree(directory, ignore_errors=True)
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] in ("study", "_run", "_claim"):
        from store_at_size import study_main

        sys.exit(study_main(sys.argv[1:]))
    sys.exit(main())
