"""Every command at a study's size: `python bench/bench_store.py study`.

    python bench/bench_store.py study                       # 1,300 and 13,000 prompts, SQLite and PostgreSQL
    python bench/bench_store.py study --large               # and 100,000 prompts
    python bench/bench_store.py study --backends sqlite --sizes 1300
    python bench/bench_store.py study --python /work/main/.venv/bin/python   # another csr's commands

Stores of N prompts x 3 iterations are filled through the engine's own write
path, as `csr generate` / `csr iterate` fill them: `start_iteration`, then per
batch `release_unheld`, `claim` and `complete(tree)` (a tree of about 50
candidates, as the paper-sized study of issue 26 had), then per iteration a
curation, a training run with its model version, and a CHAIR evaluation.
Stores are kept (SQLite under --dir, PostgreSQL databases csr_bench_<N>, see --pg-prefix) and
reused by later runs; --rebuild fills them again.
Kept stores are upgraded to this csr's schema first; PostgreSQL tables run
with autovacuum off (as issue 26's server). `--pg-copy-from-sqlite 13000`
makes that size's PostgreSQL store a COPY of the SQLite one (then VACUUM
(ANALYZE) of the tree tables, as csr's writes leave them) where a fill
through the write path would take hours.

Each command then runs `--repeat` times, each in its own process (`csr`'s
own entry point in process, so interpreter start and imports are not
timed); the minimum is kept, with the process's peak RSS. The table gives
per command the time at each size, the growth ratio between sizes next to
the ratio of their sizes, and peak memory. The per-claim time is taken from
the fill (the median of the last tenth of the last iteration's claims).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import timedelta
from pathlib import Path

from bench_store import sentence_pool, tree_rows

ITERATIONS = 3
STUDY_LEVELS = (5, 10, 10, 10, 10, 5)  # about 50 candidates a tree (issue 26: 1,925,147 / 39,000)
BATCH = 8
DEFAULT_DIR = Path("/tmp/csr-bench-store")
POSTGRES_SERVER = os.environ.get("CSR_BENCH_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432")

# (label, arguments); {out} is a scratch directory of the run, {cache} a
# DuckDB cache kept beside the store (the first run fills it; the minimum
# over the runs is then a warm one).
COMMANDS = (
    ("curate --iter 3", ["curate", "--iter", "3", "--pair-set", "bench-{uid}"]),
    ("stats --iter 3", ["stats", "--iter", "3", "--json"]),
    ("stats", ["stats", "--json"]),
    ("stats --cache (warm)", ["stats", "--json", "--cache", "{cache}"]),
    ("report", ["report", "--out", "{out}/report"]),
    ("status", ["status"]),
    ("export --iter 3", ["export", "--iter", "3", "--out", "{out}/pairs.json"]),
    ("lineage --model-version 3", ["lineage", "--model-version", "3"]),
    # release_unheld + claim of a batch of 8 at the start of an iteration (all its items pending)
    ("claim (median of 200, rolled back)", ["_claim"]),
)


def study_tree(rng: random.Random, sentences: list[str]):
    """A tree as the search hands it to `Store.write_tree`: candidates and final responses."""
    from csr.storage.trees import Tree

    rows = tree_rows(rng, sentences, STUDY_LEVELS)
    for row in rows:
        row["token_ids"] = [rng.randrange(32000) for _ in range(row["token_count"])]
        row["beam_score"] = row["logprob_sum"]
        row["text_rank"] = rng.random()
        row["image_rank"] = rng.random()
    responses = []
    for leaf in rows:
        if not leaf["is_final"]:
            continue
        path, node = [], leaf
        while node is not None:
            path.append(node)
            node = rows[node["parent_node"]] if node["parent_node"] is not None else None
        path.reverse()
        responses.append({
            "leaf_node": leaf["node"],
            "text": "".join(n["text"] for n in path),
            "token_ids": [t for n in path for t in n["token_ids"]],
            "token_count": sum(n["token_count"] for n in path),
            "sentence_count": len(path),
            "logprob_sum": sum(n["logprob_sum"] for n in path),
            "r_t_sum": sum(n["r_t"] for n in path),
            "r_i_sum": sum(n["r_i"] for n in path),
            "text_rank_sum": sum(n["text_rank"] for n in path),
            "image_rank_sum": sum(n["image_rank"] for n in path),
            "is_truncated": False,
        })
    return Tree(candidates=rows, responses=responses)


def build(url: str, prompts: int, seed: int = 0) -> dict:
    """Fill a new store at `url` through the engine's write path; returns fill figures."""
    from csr.storage.curation import TRAINING_SELECTION, CurationSettings
    from csr.storage.store import Store

    rng = random.Random(seed)
    sentences = sentence_pool(rng)
    store, _ = Store.create(url)
    figures: dict = {"prompts": prompts}
    start = time.perf_counter()
    with store:
        store.register_base_model("bench/base", "bench/clip", None)
        store.add_prompts([{"sha256": f"{i:064x}", "root": "/nonexistent", "rel_path": f"{i}.jpg",
                            "size_bytes": 1, "width": 336, "height": 336} for i in range(1, prompts + 1)],
                          [{"external_id": f"p{i}", "image_sha256": f"{i:064x}", "text": "Describe the image in detail.",
                            "source": "bench"} for i in range(1, prompts + 1)])
        for iteration in range(1, ITERATIONS + 1):
            claim_s, write_s = _generate(store, iteration, rng, sentences)
            tail = claim_s[-max(1, len(claim_s) // 10):]
            figures[f"claim_ms_iter{iteration}"] = statistics.median(tail) * 1000
            figures[f"tree_write_ms_iter{iteration}"] = statistics.median(write_s) * 1000
            result = store.curate(iteration, CurationSettings(), make_default=True)
            run = store.begin_training_run(iteration, store.pair_set(iteration).id, TRAINING_SELECTION,
                                           result.result_hash, {"bench": True}, "/tmp")
            store.register_version(version=iteration, parent=iteration - 1, iteration=iteration,
                                   path=f"bench/v{iteration}", weights_hash=f"{iteration:064x}", lora_config={},
                                   metrics={}, run_id=run)
            store.record_evaluation(model_version=iteration, benchmark="chair", settings={"dataset": "bench"},
                                    dataset_hash="0" * 64, metrics={"chair_s": 40.0, "chair_i": 10.0},
                                    items=[{"id": k, "caption": "A cat."} for k in range(500)],
                                    n_responses=500, chair_s=40.0, chair_i=10.0, mean_words=90.0)
            print(f"  iteration {iteration}: {prompts} trees, claim {figures[f'claim_ms_iter{iteration}']:.2f} ms, "
                  f"tree {figures[f'tree_write_ms_iter{iteration}']:.2f} ms, {result.pairs} pairs "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)
    figures["fill_s"] = time.perf_counter() - start
    return figures


def _generate(store, iteration: int, rng: random.Random, sentences: list[str]) -> tuple[list[float], list[float]]:
    store.start_iteration(iteration, "paper", {"search": {"lam": 0.9}, "bench": True})
    worker = store.register_worker(iteration, "cpu")
    claim_s, write_s = [], []
    while True:
        store.release_unheld(worker)
        start = time.perf_counter()
        claims = store.claim(iteration, worker, BATCH, timedelta(minutes=30), 3)
        claim_s.append(time.perf_counter() - start)
        if not claims:
            break
        for claim in claims:
            tree = study_tree(rng, sentences)
            start = time.perf_counter()
            store.write_tree(claim, worker, iteration, tree)
            write_s.append(time.perf_counter() - start)
    store.stop_worker(worker)
    store.finish_iteration_if_done(iteration)
    return claim_s[:-1] or claim_s, write_s


def store_url(backend: str, prompts: int, directory: Path, database_prefix: str = "csr_bench_") -> str:
    if backend == "sqlite":
        return f"sqlite:///{directory / f'study-{prompts}.db'}"
    return f"{POSTGRES_SERVER}/{database_prefix}{prompts}"


def _exists(url: str) -> bool:
    from sqlalchemy import create_engine, text

    if url.startswith("sqlite"):
        return Path(url.removeprefix("sqlite:///")).exists() and Path(f"{url.removeprefix('sqlite:///')}.json").exists()
    server, name = url.rsplit("/", 1)
    engine = create_engine(f"{server}/postgres")
    with engine.connect() as conn:
        found = conn.execute(text("SELECT 1 FROM pg_database WHERE datname = :n"), {"n": name}).first()
    engine.dispose()
    return found is not None


def _drop(url: str) -> None:
    from sqlalchemy import create_engine

    if url.startswith("sqlite"):
        for suffix in ("", "-wal", "-shm", ".json"):
            Path(f"{url.removeprefix('sqlite:///')}{suffix}").unlink(missing_ok=True)
        return
    server, name = url.rsplit("/", 1)
    engine = create_engine(f"{server}/postgres", isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {name}")
        conn.exec_driver_sql(f"CREATE DATABASE {name}")
    engine.dispose()


def autovacuum_off(url: str) -> None:
    """PostgreSQL: no autovacuum on the store's tables (issue 26's server ran with
    autovacuum = off): the planner has only the statistics csr's own ANALYZE gives it."""
    from sqlalchemy import create_engine, inspect

    if url.startswith("sqlite"):
        return
    engine = create_engine(url, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        for table in inspect(conn).get_table_names():
            conn.exec_driver_sql(f'ALTER TABLE "{table}" SET (autovacuum_enabled = false)')
    engine.dispose()


def upgrade(url: str) -> None:
    """Bring a kept store to this csr's schema (stores filled by an older revision)."""
    from csr.storage import migrate
    from csr.storage.db import make_engine

    engine = make_engine(url)
    try:
        before, after = migrate.upgrade(engine)
    finally:
        engine.dispose()
    if before != after:
        print(f"  {url}: schema {before} -> {after}", flush=True)


def copy_store(sqlite_url: str, url: str) -> dict:
    """Fill the PostgreSQL store at `url` with every row of a SQLite store (COPY,
    table by table in foreign-key order), then set the id sequences and gather
    statistics as csr does after its writes. For sizes whose fill through the
    write path takes hours on PostgreSQL: the rows are the same, the fill's
    claim and tree-write figures are not taken."""
    import sqlite3

    from sqlalchemy import Boolean, create_engine

    from csr.storage.models import Base
    from csr.storage.store import TREE_TABLES, create_store

    create_store(url)[0].dispose()
    source = sqlite3.connect(sqlite_url.removeprefix("sqlite:///"))
    engine = create_engine(url)
    start = time.perf_counter()
    raw = engine.raw_connection()
    try:
        cursor = raw.cursor()
        for table in Base.metadata.sorted_tables:
            columns = [c.name for c in table.columns]
            flags = [isinstance(c.type, Boolean) for c in table.columns]
            names = ", ".join(f'"{c}"' for c in columns)
            rows = source.execute(f'SELECT {names} FROM "{table.name}"')
            with cursor.copy(f'COPY "{table.name}" ({names}) FROM STDIN') as copy:
                for row in rows:
                    copy.write_row([bool(v) if flag and v is not None else v for v, flag in zip(row, flags, strict=True)])
        raw.commit()
        for table in Base.metadata.sorted_tables:  # the next id after the copied ones
            for column in table.primary_key.columns:
                cursor.execute("SELECT pg_get_serial_sequence(%s, %s)", (table.name, column.name))
                (sequence,) = cursor.fetchone()
                if sequence:
                    cursor.execute(f'SELECT setval(%s, coalesce((SELECT max("{column.name}") FROM "{table.name}"), 0) + 1, '
                                   "false)", (sequence,))
        raw.commit()
    finally:
        raw.close()
    source.close()
    # What csr's own writes leave behind: VACUUM (ANALYZE) of the tree tables
    # (storage/store.py: analyze, after each tenth of growth) and statistics.
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        for table in TREE_TABLES:
            conn.exec_driver_sql(f"VACUUM (ANALYZE) {table}")
        conn.exec_driver_sql("ANALYZE")
    engine.dispose()
    return {"copied_from": sqlite_url, "copy_s": time.perf_counter() - start}


def _fill_record(url: str, directory: Path) -> Path:
    if url.startswith("sqlite"):
        return Path(f"{url.removeprefix('sqlite:///')}.json")
    return directory / f"{url.rsplit('/', 1)[1]}.json"


def run_once(argv: list[str]) -> int:
    """`_run URL ARGS...`: one csr command in this process; prints seconds, exit code and peak RSS."""
    from csr.cli.app import main

    url, args = argv[0], argv[1:]
    sys.argv = ["csr", "--db", url, *args]
    code = 0
    devnull = open(os.devnull, "w")  # noqa: SIM115
    saved = sys.stdout
    start = time.perf_counter()
    try:
        sys.stdout = devnull
        main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.stdout = saved
    seconds = time.perf_counter() - start
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"seconds": seconds, "rc": code, "peak_mb": peak_mb}))
    return 0


def _fill_ms(fill: dict, key: str) -> str:
    return f"{fill[key]:.2f} ms" if key in fill else "(a copy, not filled)"


def claim_once(argv: list[str]) -> int:
    """`_claim URL`: claims of a batch at the start of iteration 3 (its items set
    back to pending), each with the worker's release_unheld before it, all in
    one transaction that is rolled back; prints the median ms per claim."""
    from sqlalchemy import text, update

    from csr.storage import work
    from csr.storage.clock import utcnow
    from csr.storage.db import make_engine
    from csr.storage.models import WorkItem

    engine = make_engine(argv[0])
    times = []
    with engine.begin() as conn:
        conn.execute(text("UPDATE work_items SET state = 'pending', worker_id = NULL, attempts = 0, "
                          "lease_expires_at = NULL WHERE iteration = 3"))
        worker = conn.execute(text("SELECT min(id) FROM workers")).scalar_one()
        for _ in range(200):
            start = time.perf_counter()
            conn.execute(update(WorkItem).where(WorkItem.worker_id == worker, WorkItem.state == "claimed")
                         .values(state="done", worker_id=None, lease_expires_at=None, updated_at=utcnow()))
            work.claim_in(conn, 3, worker, BATCH, timedelta(minutes=30), 3)
            times.append(time.perf_counter() - start)
        conn.rollback()
    engine.dispose()
    print(json.dumps({"seconds": statistics.median(times), "rc": 0, "peak_mb": 0}))
    return 0


def measure(python: str, url: str, args: list[str], repeat: int, timeout: float, cache: Path) -> dict:
    runs = []
    for _ in range(repeat):
        with tempfile.TemporaryDirectory(prefix="csr-bench-run-") as out:
            filled = [a.format(uid=uuid.uuid4().hex[:8], out=out, cache=cache) for a in args]
            try:
                mode = "_claim" if args == ["_claim"] else "_run"
                done = subprocess.run([python, str(Path(__file__).with_name("bench_store.py")), mode, url,
                                       *(filled if mode == "_run" else [])],
                                      capture_output=True, text=True, timeout=timeout,
                                      env={**os.environ, "OMP_NUM_THREADS": "1"})
            except subprocess.TimeoutExpired:
                return {"seconds": None, "peak_mb": None, "note": f"over {timeout:.0f} s"}
            lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
            if done.returncode != 0 or not lines:
                return {"seconds": None, "peak_mb": None, "note": (done.stderr.strip().splitlines() or ["?"])[-1]}
            result = json.loads(lines[-1])
            if result["rc"] != 0:
                return {"seconds": None, "peak_mb": None, "note": f"exit {result['rc']}: {done.stderr.strip()[-200:]}"}
            runs.append(result)
    best = min(runs, key=lambda r: r["seconds"])
    return {"seconds": best["seconds"], "peak_mb": max(r["peak_mb"] for r in runs)}


def _cell(result: dict | None) -> str:
    if result is None:
        return "-"
    if result.get("seconds") is None:
        return result.get("note", "failed")
    if not result["peak_mb"]:  # a claim: milliseconds, no process of its own to weigh
        return f"{result['seconds'] * 1000:.2f} ms"
    return f"{result['seconds']:.2f} s / {result['peak_mb']:.0f} MB"


def study_main(argv: list[str]) -> int:
    if argv[0] == "_run":
        return run_once(argv[1:])
    if argv[0] == "_claim":
        return claim_once(argv[1:])
    parser = argparse.ArgumentParser(prog="bench_store.py study", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=lambda s: [int(x) for x in s.split(",")], default=[1300, 13000])
    parser.add_argument("--large", action="store_true", help="add 100,000 prompts")
    parser.add_argument("--backends", default="sqlite,postgresql")
    parser.add_argument("--dir", type=Path, default=DEFAULT_DIR, help="where SQLite stores and fill records go")
    parser.add_argument("--rebuild", action="store_true", help="fill the stores again")
    parser.add_argument("--build-only", action="store_true")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=600, help="seconds one command may take")
    parser.add_argument("--commands", default=None, help="labels to run, separated by semicolons (default: all)")
    parser.add_argument("--python", default=sys.executable, help="the interpreter whose csr runs the commands")
    parser.add_argument("--pg-prefix", default="csr_bench_", help="PostgreSQL databases are <prefix><prompts>")
    parser.add_argument("--pg-copy-from-sqlite", type=lambda s: [int(x) for x in s.split(",")], default=[],
                        help="sizes whose PostgreSQL store is a copy of the SQLite store of that size "
                             "(filled through the write path first) instead of a fill of its own")
    args = parser.parse_args(argv[1:])
    sizes = sorted(set(args.sizes + ([100_000] if args.large else [])))
    args.dir.mkdir(parents=True, exist_ok=True)
    commands = [c for c in COMMANDS if args.commands is None or c[0] in args.commands.split(";")]
    for backend in args.backends.split(","):
        table: dict[str, dict[int, dict]] = {}
        fills: dict[int, dict] = {}
        for prompts in sizes:
            url = store_url(backend, prompts, args.dir, args.pg_prefix)
            record = _fill_record(url, args.dir)
            if args.rebuild or not _exists(url) or not record.exists():
                _drop(url)
                if backend == "postgresql" and prompts in args.pg_copy_from_sqlite:
                    source = store_url("sqlite", prompts, args.dir)
                    print(f"{backend}: copying {source} to {url}", flush=True)
                    upgrade(source)
                    record.write_text(json.dumps({"prompts": prompts, **copy_store(source, url)}))
                else:
                    print(f"{backend}: filling {prompts} prompts x {ITERATIONS} iterations at {url}", flush=True)
                    record.write_text(json.dumps(build(url, prompts)))
            upgrade(url)
            autovacuum_off(url)
            fills[prompts] = json.loads(record.read_text())
            if args.build_only:
                continue
            for label, command in commands:
                cache = record.with_name(record.name.removesuffix(".json") + ".cache.duckdb")
                result = measure(args.python, url, command, args.repeat, args.timeout, cache)
                table.setdefault(label, {})[prompts] = result
                print(f"  {backend} {prompts}: {label}: {_cell(result)}", flush=True)
        if args.build_only:
            continue
        print(f"\n{backend} (min of {args.repeat} runs; time / peak RSS; growth = time ratio for the size ratio)")
        header = ["command", *[f"{n:,} prompts" for n in sizes],
                  *[f"growth {a:,}->{b:,} (x{b / a:g})" for a, b in zip(sizes, sizes[1:], strict=False)]]
        print("| " + " | ".join(header) + " |")
        print("|" + "---|" * len(header))
        for label, by_size in table.items():
            cells = [_cell(by_size.get(n)) for n in sizes]
            growth = []
            for a, b in zip(sizes, sizes[1:], strict=False):
                ta, tb = (by_size.get(n, {}).get("seconds") for n in (a, b))
                growth.append(f"x{tb / ta:.1f}" if ta and tb else "-")
            print("| " + " | ".join([label, *cells, *growth]) + " |")
        claims = [_fill_ms(fills[n], "claim_ms_iter3") for n in sizes]
        trees = [_fill_ms(fills[n], "tree_write_ms_iter3") for n in sizes]
        print("| " + " | ".join(["claim (fill, iteration 3)", *claims, *["-"] * (len(sizes) - 1)]) + " |")
        print("| " + " | ".join(["tree write (fill, iteration 3)", *trees, *["-"] * (len(sizes) - 1)]) + " |")
    return 0
