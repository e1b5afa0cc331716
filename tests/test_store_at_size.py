"""The store at a study's size: readers never wait for a writer, curation
holds no lock while it selects, the queue reads index ranges, and the
release's depth-first pair rule (reference-code's default) where it differs
from csr's distinct rule."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta

import pytest
from sqlalchemy import Connection, text

from csr.engine import iterations
from csr.storage import curation
from csr.storage.store import PAUSE_ENV, Store, open_store
from csr.storage.trees import Tree
from tests.cli_runner import invoke_csr
from tests.db_backends import CSR_SCRIPT, only_on


def _candidate(node: int, parent: int | None, depth: int, text_: str, final: bool) -> dict:
    return {"node": node, "parent_node": parent, "depth": depth, "sibling_index": node, "text": text_,
            "token_count": 3, "logprob_sum": -1.0, "r_t": 0.5, "r_i": 20.0, "reward": 1.0,
            "cumulative_reward": 1.0, "is_final": final, "is_kept": not final, "exclusion_reason": None,
            "finish_reason": "eos" if final else "sentence_end", "token_ids": [1, 2, 3],
            "text_rank": 0.0, "image_rank": 0.0}


def _response(leaf: int, text_: str, rank_sum: float, sentences: int = 2) -> dict:
    return {"leaf_node": leaf, "text": text_, "token_ids": [1, 2, 3] * sentences, "token_count": 3 * sentences,
            "sentence_count": sentences, "logprob_sum": -2.0, "r_t_sum": 1.0, "r_i_sum": 40.0,
            "text_rank_sum": rank_sum, "image_rank_sum": rank_sum, "is_truncated": False}


def _tied_tree() -> Tree:
    """Two roots; leaves A (node 2, under root 1) and B (node 3, under root 0) tie
    at the best score, C (node 4, under root 0) and D (node 5, under root 1) at the
    worst. By candidate id: A then B, C then D; depth-first: B, C, A, D."""
    candidates = [
        _candidate(0, None, 0, "Root zero.", False),
        _candidate(1, None, 0, "Root one.", False),
        _candidate(2, 1, 1, " A.", True),
        _candidate(3, 0, 1, " B.", True),
        _candidate(4, 0, 1, " C.", True),
        _candidate(5, 1, 1, " D.", True),
    ]
    responses = [_response(2, "Root one. A.", 2.0), _response(3, "Root zero. B.", 2.0),
                 _response(4, "Root zero. C.", 0.0), _response(5, "Root one. D.", 0.0)]
    return Tree(candidates, responses)


def _one_response_tree() -> Tree:
    return Tree([_candidate(0, None, 0, "Only one.", True)], [_response(0, "Only one.", 1.0, sentences=1)])


def _prompts(url: str, n: int) -> Store:
    store = Store.open(url)
    store.register_base_model("base", "clip", None)
    store.add_prompts([{"sha256": f"{i:064x}", "root": "/images", "rel_path": f"{i}.jpg", "size_bytes": 1,
                        "width": 8, "height": 8} for i in range(1, n + 1)],
                      [{"external_id": f"p{i}", "image_sha256": f"{i:064x}", "text": "Describe.", "source": "test"}
                       for i in range(1, n + 1)])
    return store


@contextmanager
def _sql(url: str) -> Iterator[Connection]:
    """A connection for what no Store method does: plans, raw updates."""
    engine = open_store(url)
    try:
        with engine.begin() as conn:
            yield conn
    finally:
        engine.dispose()


def _study(url: str, trees: list[Tree], preset: str = "reference-code") -> Store:
    """A store with one generated iteration holding `trees`, written as a worker writes them."""
    store = _prompts(url, len(trees))
    store.start_iteration(1, preset, {"search": {"lam": 0.9}})
    worker = store.register_worker(1, "cpu")
    claims = store.claim(1, worker, len(trees), timedelta(minutes=5), 3)
    for claim, tree in zip(claims, trees, strict=True):
        assert store.write_tree(claim, worker, 1, tree)
    store.finish_iteration_if_done(1)
    return store


def _leaf_ids(url: str) -> dict[str, int]:
    with _sql(url) as conn:
        rows = conn.execute(text("SELECT text, leaf_candidate_id FROM responses")).all()
    return {t.split()[-1].rstrip("."): leaf for t, leaf in rows}


def test_the_release_pair_rule_differs_from_the_distinct_rule(head_store_url):
    with _study(head_store_url, [_tied_tree(), _one_response_tree()]) as store:
        leaf = _leaf_ids(head_store_url)
        with _sql(head_store_url) as conn:
            distinct = curation.select_pairs(conn, 1, curation.CurationSettings("reference-code", 0.9))
            release = curation.select_pairs(
                conn, 1, curation.CurationSettings("reference-code", 0.9, pair_rule="depth-first"))
        # distinct: ties to the lower candidate id, and no pair without a second text
        assert [(r["chosen_candidate_id"], r["rejected_candidate_id"]) for r in distinct] == [(leaf["A"], leaf["C"])]
        # the release: the first best and the last worst in depth-first order; the one response with itself
        assert [(r["prompt_id"], r["chosen_candidate_id"], r["rejected_candidate_id"]) for r in release] == [
            (1, leaf["B"], leaf["D"]), (2, leaf["one"], leaf["one"])]
        assert release[1]["chosen_text"] == release[1]["rejected_text"] and release[1]["margin"] == 0.0

        # reference-code curates by the release's rule unless told otherwise, and records the rule
        made = iterations.curate(store, 1)
        assert made.name == "reference-code-lambda0.9-margin0" and made.pairs == 2
        overridden = iterations.curate(store, 1, pair_rule="distinct")
        assert overridden.name == "reference-code-lambda0.9-margin0-distinct" and overridden.pairs == 1
        assert store.pair_set(1, made.name).params["pair_rule"] == "depth-first"
        assert store.pair_set(1, overridden.name).params["pair_rule"] == "distinct"
        assert "depth-first order" in store.pair_set(1, made.name).selection_sql
        # confirming an existing pair set under the same rule changes nothing
        assert not iterations.curate(store, 1).created


@pytest.mark.parametrize("backend", only_on("sqlite"))
def test_opening_and_reading_a_store_never_takes_the_write_lock(head_store_url):
    Store.open(head_store_url).close()
    path = head_store_url.removeprefix("sqlite:///")
    writer = sqlite3.connect(path, isolation_level=None, timeout=0)
    writer.execute("BEGIN IMMEDIATE")  # a writer holds the lock (a worker's tree, a curation's record)
    try:
        invoke_csr("status", db=head_store_url)  # imports done before the clock starts
        start = time.perf_counter()
        done = invoke_csr("status", db=head_store_url)
        elapsed = time.perf_counter() - start
    finally:
        writer.execute("ROLLBACK")
        writer.close()
    assert done.returncode == 0, done.stderr
    assert elapsed < 1.0, f"csr status waited {elapsed:.1f} s for a writer"


@pytest.mark.slow
@pytest.mark.parametrize("backend", only_on("sqlite"))
def test_status_answers_within_a_second_while_a_curation_runs_beside_it(head_store_url, tmp_path):
    _study(head_store_url, [_tied_tree(), _one_response_tree()]).close()
    pause = tmp_path / "curation-paused"
    env = {k: v for k, v in os.environ.items() if k != "CSR_DATABASE_URL"} | {PAUSE_ENV: str(pause)}
    curate = subprocess.Popen([str(CSR_SCRIPT), "--db", head_store_url, "curate", "--iter", "1"],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not pause.exists() and curate.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert pause.exists(), "the curation never reached its selection"
        assert pause.read_text() == "selected"  # held inside its read transaction
        invoke_csr("status", db=head_store_url)  # imports done before the clock starts
        start = time.perf_counter()
        status = invoke_csr("status", db=head_store_url)
        elapsed = time.perf_counter() - start
        assert status.returncode == 0, status.stderr
        assert elapsed < 1.0, f"csr status took {elapsed:.1f} s beside a curation"
        assert curate.poll() is None  # the curation was still running throughout
    finally:
        pause.unlink(missing_ok=True)
        out, err = curate.communicate(timeout=120)
    assert curate.returncode == 0, err
    assert "pair set 'reference-code-lambda0.9-margin0' (default) created: 2 pair(s)" in out


@pytest.mark.parametrize("backend", only_on("sqlite"))
def test_a_claim_reads_index_ranges_without_sorting(head_store_url):
    from csr.storage import work

    with _sql(head_store_url) as conn:
        plan = conn.exec_driver_sql(
            "EXPLAIN QUERY PLAN " + work._NEXT_IDS_SQLITE.replace(":iteration", "1").replace(
                ":max_attempts", "3").replace(":limit", "8").replace(":now", "'2026-01-01'")
        ).all()
        details = " | ".join(row[-1] for row in plan)
        assert "ix_work_items_next" in details and "ix_work_items_claim" in details
        # the pending items come out of the index in id order: no sort inside their branch
        [pending] = [row for row in plan if "ix_work_items_next" in row[-1]]
        assert not [row for row in plan if row[1] == pending[1] and "TEMP B-TREE" in row[-1]]
        holder = conn.exec_driver_sql(
            "EXPLAIN QUERY PLAN UPDATE work_items SET state = 'pending' WHERE worker_id = 1 AND state = 'claimed'"
        ).all()
        assert "ix_work_items_holder" in " | ".join(row[-1] for row in holder)


def test_claims_take_pending_items_in_id_order_then_expired_leases(head_store_url):
    with _prompts(head_store_url, 5) as store:
        store.start_iteration(1, "paper", {"search": {"lam": 0.9}})
        first = store.register_worker(1, "cpu")
        second = store.register_worker(1, "cpu")
        expired = store.claim(1, first, 2, timedelta(seconds=-1), 3)  # leases already over
        taken = store.claim(1, second, 4, timedelta(minutes=5), 3)
        assert [c.prompt_id for c in expired] == [1, 2]
        # the lowest ids first, whichever state: the abandoned two, then pending 3 and 4
        assert [c.prompt_id for c in taken] == [1, 2, 3, 4]
        assert store.release_unheld(second) == 4
        assert store.release_unheld(second) == 0


def test_items_out_of_attempts_are_failed_once_the_claimable_ones_are_taken(head_store_url):
    with _prompts(head_store_url, 4) as store:
        store.start_iteration(1, "paper", {"search": {"lam": 0.9}})
        with _sql(head_store_url) as conn:  # left pending by a run with --max-attempts 5
            conn.execute(text("UPDATE work_items SET attempts = 3 WHERE prompt_id IN (1, 3)"))
        worker = store.register_worker(1, "cpu")
        taken = store.claim(1, worker, 4, timedelta(minutes=5), 2)
        assert [c.prompt_id for c in taken] == [2, 4]
        assert store.outstanding(1, worker)[0] == 2  # not failed while claimable ones remain
        assert store.claim(1, worker, 4, timedelta(minutes=5), 2) == []
        with _sql(head_store_url) as conn:
            failed = conn.execute(text(
                "SELECT prompt_id, last_error FROM work_items WHERE state = 'failed' ORDER BY prompt_id")).all()
        assert [tuple(row) for row in failed] == [(1, "no attempts left"), (3, "no attempts left")]
        assert store.outstanding(1, worker)[0] == 0


def test_pair_sets_made_before_the_rule_was_recorded_are_confirmed(head_store_url):
    with _study(head_store_url, [_tied_tree()], preset="paper") as store:
        made = iterations.curate(store, 1)
        params = {k: v for k, v in store.pair_set(1, made.name).params.items() if k != "pair_rule"}
        with _sql(head_store_url) as conn:  # a pair set as csr recorded it before the pair rule
            conn.execute(text("UPDATE pair_sets SET params = :p"), {"p": json.dumps(params)})
        again = iterations.curate(store, 1)
        assert not again.created and again.result_hash == made.result_hash


@pytest.mark.postgres
@pytest.mark.parametrize("backend", only_on("postgresql"))
def test_postgresql_has_planner_statistics_before_a_curation(head_store_url):
    with _study(head_store_url, [_tied_tree(), _one_response_tree()]) as store:
        iterations.curate(store, 1)
        with _sql(head_store_url) as conn:
            analyzed = dict(conn.execute(text(
                "SELECT relname, last_analyze IS NOT NULL FROM pg_stat_user_tables "
                "WHERE relname IN ('responses', 'candidates', 'work_items')"
            )).all())
    assert analyzed["responses"] is True


