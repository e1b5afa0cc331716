"""csr sql / csr stats over SQLite and PostgreSQL stores, and the candidate write path."""

from __future__ import annotations

import json
import random
import statistics
import subprocess
import threading
from pathlib import Path

import duckdb
import pytest
from sqlalchemy import func, select

from csr.storage import analytics
from csr.storage.db import make_engine
from csr.storage.errors import StoreError
from csr.storage.models import Candidate, Iteration
from csr.storage.trees import CANDIDATE_COLUMNS, insert_candidates
from tests.analytics_fixtures import (
    NOW,
    assert_close,
    fill_study,
    one_line_error,
    random_tree,
    sqlite_store,
)
from tests.analytics_fixtures import FilledStore as Store
from tests.cli_runner import invoke_csr
from tests.db_backends import CSR_SCRIPT, run_csr


def sql_json(url: str, query: str) -> list[dict]:
    result = invoke_csr("sql", query, "--format", "json", db=url)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


# ---------------------------------------------------------------- csr sql


def test_sql_count_equals_sqlalchemy(store: Store):
    engine = make_engine(store.url)
    with engine.connect() as conn:
        expected = conn.execute(select(func.count()).select_from(Candidate)).scalar_one()
    engine.dispose()
    assert expected == sum(len(tree.rows) for tree in store.study.trees)
    rows = sql_json(store.url, "select count(*) AS n from candidates")
    assert rows == [{"n": expected}]


def test_every_table_and_view_is_exposed(store: Store):
    names = {row["name"] for row in sql_json(store.url, "SELECT view_name AS name FROM duckdb_views() WHERE NOT internal AND schema_name = 'main'")}
    for table in ("images", "prompts", "iterations", "model_versions", "work_items", "workers", "candidates",
                  "pair_sets", "pairs", "training_runs", "evaluations", "alembic_version"):
        assert table in names
    assert {"responses", "response_paths", "response_sentences", "pair_responses", "pair_stats"} <= names
    # Booleans read as booleans on both backends.
    kinds = sql_json(store.url, "SELECT typeof(is_final) AS t FROM candidates LIMIT 1")
    assert kinds == [{"t": "BOOLEAN"}]


WRITES = [
    "INSERT INTO candidates SELECT * FROM candidates LIMIT 1",
    "DELETE FROM candidates",
    "UPDATE pairs SET margin = 0",
    "DELETE FROM store.candidates",
    "CREATE TABLE x AS SELECT 1",
    "DROP VIEW candidates",
    "ATTACH ':memory:' AS other",
    "DETACH store",
    "COPY candidates TO 'out.csv'",
    "INSTALL sqlite",
    "LOAD sqlite",
    "SET threads = 1",
    "PRAGMA threads = 1",
    "CALL checkpoint()",
    "EXPLAIN ANALYZE DELETE FROM candidates",
    "SELECT 1; DELETE FROM candidates",
]


@pytest.mark.parametrize("statement", WRITES)
def test_writes_are_refused_and_store_unchanged(store: Store, statement: str, tmp_path: Path, monkeypatch):
    # In process (typer's runner): the console script's one-line error is
    # tested once below; here, that the command refuses and changes nothing.
    from typer.testing import CliRunner

    from csr.cli.app import app

    monkeypatch.chdir(tmp_path)
    before = store.fingerprint()
    result = CliRunner().invoke(app, ["--db", store.url, "sql", statement])
    assert isinstance(result.exception, StoreError) and "read-only" in str(result.exception)
    assert store.fingerprint() == before
    assert not (tmp_path / "out.csv").exists()


def test_a_refused_write_is_one_line_from_the_console_script(sqlite_study: Store, tmp_path: Path):
    result = run_csr("--db", sqlite_study.url, "sql", WRITES[0], cwd=tmp_path)
    assert "read-only" in one_line_error(result)


def test_read_only_even_without_the_guard(store: Store):
    """The guard is one layer; the attachment itself is READ_ONLY."""
    before = store.fingerprint()
    schema = "public" if store.backend == "postgresql" else "main"
    target = f"{analytics.ALIAS}.{schema}"
    with analytics.connect(store.url) as con:
        for statement in (f"DELETE FROM {target}.candidates", f"INSERT INTO {target}.evaluations (id) VALUES (99)",
                          f"DROP TABLE {target}.pairs", f"UPDATE {target}.pairs SET margin = 0"):
            with pytest.raises(duckdb.Error, match="read-only|read only"):
                con.execute(statement)
        with pytest.raises(duckdb.Error, match="locked"):
            con.execute("SET lock_configuration = false")
    assert store.fingerprint() == before


@pytest.mark.parametrize("query", [
    "SELECT 1", "with x AS (SELECT 1 AS a) SELECT * FROM x", "FROM candidates LIMIT 1", "VALUES (1)",
    "SHOW TABLES", "DESCRIBE candidates", "SUMMARIZE SELECT 1 AS a", "PRAGMA table_info('candidates')",
    "EXPLAIN SELECT 1", "EXPLAIN ANALYZE SELECT 1", "/* note */ explain analyze select 1",
    "SELECT 1; SELECT 2",
])
def test_reads_pass_the_guard(query: str):
    assert analytics.read_statements(query)


@pytest.mark.parametrize("query", WRITES + ["", "SELEC 1", "EXPORT DATABASE 'x'", "VACUUM", "USE store",
                                            "RESET threads", "CHECKPOINT"])
def test_guard_refuses(query: str):
    with pytest.raises(StoreError):
        analytics.read_statements(query)


def test_sql_output_formats(sqlite_study: Store, tmp_path: Path):
    url = sqlite_study.url
    query = "SELECT iteration, count(*) AS n, avg(reward) AS mean FROM candidates GROUP BY iteration ORDER BY iteration"
    expected = sql_json(url, query)
    assert [row["iteration"] for row in expected] == [1, 2]

    csv_out = invoke_csr("--db", url, "sql", query, "--format", "csv")
    assert csv_out.returncode == 0, csv_out.stderr
    lines = csv_out.stdout.strip().splitlines()
    assert lines[0] == "iteration,n,mean" and len(lines) == 3
    assert int(lines[1].split(",")[1]) == expected[0]["n"]

    table = invoke_csr("--db", url, "sql", query)
    assert table.returncode == 0 and "2 rows" in table.stdout

    parquet = tmp_path / "out.parquet"
    result = invoke_csr("--db", url, "sql", query, "--format", "parquet", "--out", str(parquet))
    assert result.returncode == 0, result.stderr
    back = duckdb.sql(f"SELECT * FROM '{parquet}' ORDER BY iteration").fetchall()
    assert [(r[0], r[1]) for r in back] == [(e["iteration"], e["n"]) for e in expected]

    json_file = tmp_path / "out.json"
    assert invoke_csr("--db", url, "sql", query, "--format", "json", "--out", str(json_file)).returncode == 0
    assert json.loads(json_file.read_text()) == expected

    # JSON columns come out as JSON, not as quoted strings; booleans as CSV true/false.
    params = sql_json(url, "SELECT params, is_default FROM pair_sets ORDER BY id")
    assert params[0] == {"params": {"rule": "sum"}, "is_default": True}
    flags = invoke_csr("--db", url, "sql", "SELECT is_default FROM pair_sets ORDER BY id", "--format", "csv")
    assert flags.stdout.split()[:3] == ["is_default", "true", "false"]

    assert "--out" in one_line_error(invoke_csr("--db", url, "sql", query, "--format", "parquet"))
    bad_format = invoke_csr("--db", url, "sql", query, "--format", "xml")
    assert bad_format.returncode == 2 and bad_format.stderr.count("\n") == 1
    assert bad_format.stderr.startswith("csr: error: Invalid value for '--format'")
    assert "query failed" in one_line_error(invoke_csr("--db", url, "sql", "SELECT nope FROM candidates"))


def test_sql_reads_stdin(sqlite_study: Store):
    result = subprocess.run(
        [str(CSR_SCRIPT), "--db", sqlite_study.url, "sql", "--format", "csv"],
        input="SELECT count(*) AS n FROM prompts;\n", capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["n", str(len(sqlite_study.study.prompt_ids))]


def test_sql_needs_a_store(tmp_path: Path):
    result = invoke_csr("--db", str(tmp_path / "missing.db"), "sql", "SELECT 1")
    assert "csr init" in one_line_error(result)
    assert not (tmp_path / "missing.db").exists()


def test_responses_view_matches_the_trees(store: Store):
    rows = sql_json(store.url, "SELECT * FROM response_paths ORDER BY leaf_id")
    expected = {}
    for tree in store.study.trees:
        for final in tree.finals():
            path = tree.path(final["node"])
            expected[tree.ids[final["node"]]] = {
                "iteration": tree.iteration,
                "prompt_id": tree.prompt_id,
                "text": tree.text(final["node"]),
                "sentences": len(path),
                "words": len(tree.text(final["node"]).split()),
                "cumulative_reward": final["cumulative_reward"],
                "sum_r_t": sum(r["r_t"] for r in path),
                "mean_r_i": statistics.fmean(r["r_i"] for r in path),
                "sum_reward": sum(r["reward"] for r in path),
            }
    assert {row["leaf_id"] for row in rows} == set(expected)
    for row in rows:
        want = expected[row["leaf_id"]]
        assert_close(row, want, f"leaf {row['leaf_id']}")
        # R(y) as the search accumulated it equals the sum of the path's R(s).
        assert row["cumulative_reward"] == pytest.approx(row["sum_reward"], rel=1e-9)


def test_words_macro():
    con = duckdb.connect()
    con.execute(analytics.WORDS_MACRO)
    for value in ("", "one", "two words", "  padded   spaces ", "tab\tand\nnewline", "   "):
        assert con.execute("SELECT words(?)", [value]).fetchone()[0] == len(value.split()), value


# ---------------------------------------------------------------- live store


@pytest.mark.slow  # csr processes reading beside a writer that keeps a core busy: ~15 s
def test_sql_while_a_worker_writes(tmp_path: Path):
    """Reads run beside a writer (SQLite WAL) and see whole trees only."""
    url, engine = sqlite_store(tmp_path)
    study = fill_study(engine, tmp_path / "images", prompts=2, iterations=1, evaluations=False)
    base = sum(len(t.rows) for t in study.trees)
    tree = random_tree(random.Random(3), width=4, max_depth=3)
    size = len(tree)
    stop = threading.Event()
    written = []

    def writer() -> None:
        # Re-writes the same tree under fresh iteration numbers, one transaction each.
        number = 100
        while not stop.is_set():
            with engine.begin() as conn:
                conn.execute(Iteration.__table__.insert().values(
                    number=number, policy_version=0, preset="paper", config={}, config_hash="0" * 64,
                    state="generating", created_at=NOW))
                insert_candidates(conn, number, study.prompt_ids[0], tree)
            written.append(number)
            number += 1

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        counts = []
        for _ in range(4):
            # A csr process of its own: DuckDB's SQLite and Python's must not share one
            # process's file locks while both have the store open.
            rows = run_csr("sql", "SELECT count(*) AS n FROM candidates", "--format", "json", db=url)
            assert rows.returncode == 0, rows.stderr
            counts.append(json.loads(rows.stdout)[0]["n"])
    finally:
        stop.set()
        thread.join()
        engine.dispose()
    assert written, "the writer never committed"
    assert counts == sorted(counts)
    assert all((n - base) % size == 0 for n in counts), (counts, base, size)


# ---------------------------------------------------------------- store API


def add_iteration(conn, number: int) -> None:
    conn.execute(Iteration.__table__.insert().values(
        number=number, policy_version=0, preset="paper", config={}, config_hash="0" * 64, state="generating",
        created_at=NOW))


def test_insert_candidates_round_trip(store: Store):
    tree = random_tree(random.Random(11))
    tree[0].pop("finish_reason")  # optional column
    engine = make_engine(store.url)
    try:
        with engine.begin() as conn:
            add_iteration(conn, 7)
            assert insert_candidates(conn, 7, store.study.prompt_ids[0], []) == 0
            assert insert_candidates(conn, 7, store.study.prompt_ids[0], tree) == len(tree)
        with engine.connect() as conn:
            stored = conn.execute(
                select(*(getattr(Candidate, c) for c in CANDIDATE_COLUMNS))
                .where(Candidate.iteration == 7).order_by(Candidate.node)
            ).all()
    finally:
        engine.dispose()
    assert len(stored) == len(tree)
    for row, want in zip(stored, tree, strict=True):
        for column, value in zip(CANDIDATE_COLUMNS, row, strict=True):
            expected = want.get(column)
            if isinstance(expected, float):
                assert value == pytest.approx(expected, rel=1e-12), column
            else:
                assert value == expected, column
    assert stored[0].finish_reason is None


def test_insert_candidates_is_atomic_with_the_callers_transaction(store: Store):
    engine = make_engine(store.url)
    tree = random_tree(random.Random(5))
    tree[-1]["text"] = None  # NOT NULL: nothing of the transaction may remain
    try:
        with pytest.raises(Exception):  # noqa: B017 - each driver has its own IntegrityError
            with engine.begin() as conn:
                add_iteration(conn, 8)
                insert_candidates(conn, 8, store.study.prompt_ids[0], tree)
        with engine.connect() as conn:
            assert conn.execute(select(func.count()).select_from(Candidate)
                                .where(Candidate.iteration == 8)).scalar_one() == 0
            assert conn.execute(select(func.count()).select_from(Iteration)
                                .where(Iteration.number == 8)).scalar_one() == 0
    finally:
        engine.dispose()


# ---------------------------------------------------------------- --cache


def test_cache_gives_the_same_figures_and_follows_the_store(store: Store, tmp_path: Path):
    cache = tmp_path / "analytics.duckdb"
    plain = json.loads(invoke_csr("--db", store.url, "stats", "--json").stdout)
    result = invoke_csr("--db", store.url, "stats", "--json", "--cache", cache)
    assert result.returncode == 0, result.stderr
    assert_close(json.loads(result.stdout), plain)
    assert cache.exists()

    def cached_count() -> int:
        out = invoke_csr("--db", store.url, "sql", "SELECT count(*) AS n FROM candidates", "--format", "json",
                         "--cache", cache)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)[0]["n"]

    base = sum(len(t.rows) for t in store.study.trees)
    assert cached_count() == base
    # New trees are fetched at the next use...
    tree = random_tree(random.Random(9))
    # (each write's engine is disposed before csr reads: the command runs in this
    # process, and DuckDB's SQLite must not read a file Python's SQLite holds open)
    engine = make_engine(store.url)
    try:
        with engine.begin() as conn:
            add_iteration(conn, 5)
            insert_candidates(conn, 5, store.study.prompt_ids[0], tree)
    finally:
        engine.dispose()
    assert cached_count() == base + len(tree)
    # ...and rows that disappear make the copy start again.
    engine = make_engine(store.url)
    try:
        with engine.begin() as conn:
            conn.execute(Candidate.__table__.delete().where(Candidate.iteration == 5))
    finally:
        engine.dispose()
    assert cached_count() == base
    before = store.fingerprint()
    assert "read-only" in one_line_error(invoke_csr("--db", store.url, "sql", "DELETE FROM candidates",
                                                    "--cache", cache))
    assert store.fingerprint() == before


def test_cache_refuses_the_store_file_and_a_busy_cache(sqlite_study: Store, tmp_path: Path):
    store_file = Path(sqlite_study.url.removeprefix("sqlite:///"))
    before = sqlite_study.fingerprint()
    result = invoke_csr("--db", sqlite_study.url, "sql", "SELECT 1", "--cache", store_file)
    assert "not the store" in one_line_error(result)
    assert sqlite_study.fingerprint() == before

    cache = tmp_path / "busy.duckdb"
    holder = duckdb.connect(str(cache))  # another process's writer holds the file lock
    try:
        # (csr is a process of its own here: inside this one DuckDB would see its own handle)
        result = run_csr("--db", sqlite_study.url, "sql", "SELECT 1", "--cache", cache)
        assert "analytics cache" in one_line_error(result)
    finally:
        holder.close()
    assert invoke_csr("--db", sqlite_study.url, "sql", "SELECT 1", "--cache", cache).returncode == 0


def test_interactive_prompt_on_a_terminal(sqlite_study: Store):
    """No query and a TTY on stdin: a prompt that runs reads and refuses writes."""
    import os
    import pty
    import select
    import time

    master, slave = pty.openpty()
    process = subprocess.Popen([str(CSR_SCRIPT), "--db", sqlite_study.url, "sql"], stdin=slave, stdout=slave,
                               stderr=slave, env={**os.environ, "COLUMNS": "120", "NO_COLOR": "1"})
    os.close(slave)

    def until_prompt(timeout: float = 60) -> str:
        out, end = b"", time.time() + timeout
        while time.time() < end and not out.rstrip().endswith(b">"):
            ready, _, _ = select.select([master], [], [], 0.5)
            if ready:
                out += os.read(master, 65536)
        return out.decode(errors="replace")

    try:
        assert "read-only" in until_prompt()
        os.write(master, b"SELECT count(*) AS n\n")
        until_prompt()
        os.write(master, b"FROM prompts;\n")
        assert str(len(sqlite_study.study.prompt_ids)) in until_prompt()
        os.write(master, b"DELETE FROM prompts;\n")
        assert "refused" in until_prompt()
        os.write(master, b".quit\n")
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
        os.close(master)
