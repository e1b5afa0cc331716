"""`csr stats` and `csr report` at a study's size, without timing them.

The figures come from queries the store runs itself (storage/analytics_live.py):
counts from indexes, a pair's sentence means from its responses' sums, the
report's trees by index for the pairs it shows. These tests check that those
figures equal the ones walked from the candidate trees, and that no query
reads every candidate: DuckDB never scans the candidates or responses views,
and on SQLite the plan of every store query reads those tables only by index.
"""

from __future__ import annotations

import random
import re
import sqlite3
from datetime import timedelta

import pytest

from csr.storage import analytics, analytics_figures, analytics_live
from csr.storage.curation import TRAINING_SELECTION, CurationSettings
from csr.storage.store import Store
from csr.storage.trees import Tree, word_count
from tests.analytics_fixtures import assert_close

WORDS = ("cat", "dog", "red", "table", "window", "two", "people", "street", "small", "image")
PROMPTS = 6
ITERATIONS = 2


def _tree(rng: random.Random) -> Tree:
    """A small search tree with a response per final candidate whose text is the
    path's sentences joined and whose sums are the path's (as the search writes them)."""
    rows: list[dict] = []
    level = [None]
    for depth in range(4):
        next_level = []
        for parent in level:
            for _ in range(2 if depth < 3 else 1):
                node = len(rows)
                excluded = rng.random() < 0.1
                final = not excluded and (depth == 3 or rng.random() < 0.25)
                text = (" " if depth else "") + " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 6))) + "."
                r_t, r_i = rng.random(), rng.random() * 30
                reward = 0.9 * r_i + 0.1 * r_t
                rows.append({"node": node, "parent_node": parent, "depth": depth, "sibling_index": node,
                             "text": text, "token_count": 3, "logprob_sum": -1.0, "r_t": r_t, "r_i": r_i,
                             "reward": reward,
                             "cumulative_reward": reward + (rows[parent]["cumulative_reward"] if parent is not None
                                                            else 0.0),
                             "is_final": final, "is_kept": not final, "exclusion_reason":
                             "too_short" if excluded else None, "finish_reason": "eos" if final else "sentence_end",
                             "token_ids": [1, 2, 3], "text_rank": 0.0, "image_rank": 0.0})
                if not final and not excluded:
                    next_level.append(node)
        level = next_level[:3]
        if not level:
            break
    responses = []
    for leaf in (r for r in rows if r["is_final"]):
        path, node = [], leaf
        while node is not None:
            path.append(node)
            node = rows[node["parent_node"]] if node["parent_node"] is not None else None
        path.reverse()
        responses.append({"leaf_node": leaf["node"], "text": "".join(n["text"] for n in path),
                          "token_ids": [1, 2, 3] * len(path), "token_count": 3 * len(path),
                          "sentence_count": len(path), "logprob_sum": -1.0 * len(path),
                          "r_t_sum": sum(n["r_t"] for n in path), "r_i_sum": sum(n["r_i"] for n in path),
                          "text_rank_sum": 0.0, "image_rank_sum": 0.0, "is_truncated": leaf["node"] % 5 == 0})
    return Tree(rows, responses)


@pytest.fixture
def study_url(head_store_url: str) -> str:
    """PROMPTS x ITERATIONS trees written as workers write them, each iteration curated."""
    rng = random.Random(3)
    store = Store.open(head_store_url)
    with store:
        store.register_base_model("base", "clip", None)
        store.add_prompts([{"sha256": f"{i:064x}", "root": "/nonexistent", "rel_path": f"{i}.jpg",
                            "size_bytes": 1, "width": 8, "height": 8} for i in range(1, PROMPTS + 1)],
                          [{"external_id": f"p{i}", "image_sha256": f"{i:064x}", "text": "Describe.", "source": "test"}
                           for i in range(1, PROMPTS + 1)])
        for iteration in range(1, ITERATIONS + 1):
            store.start_iteration(iteration, "paper", {"search": {"lam": 0.9}})
            worker = store.register_worker(iteration, "cpu")
            for claim in store.claim(iteration, worker, PROMPTS, timedelta(minutes=5), 3):
                assert store.write_tree(claim, worker, iteration, _tree(rng))
            store.stop_worker(worker)
            store.finish_iteration_if_done(iteration)
            store.curate(iteration, CurationSettings(), make_default=True)
            run = store.begin_training_run(iteration, store.pair_set(iteration).id, TRAINING_SELECTION, "0" * 64,
                                           {}, "/tmp")
            store.register_version(version=iteration, parent=iteration - 1, iteration=iteration,
                                   path=f"v{iteration}", weights_hash=f"{iteration:064x}", lora_config={},
                                   metrics={}, run_id=run)
    return head_store_url


def _walk_the_trees(monkeypatch) -> None:
    """Make the figures ignore the responses rows, as for a store written without them."""
    monkeypatch.setattr(analytics_live, "pairs_without_responses", lambda con, iteration: 1)
    real = analytics_live.response_figures

    def without_responses(con, iteration):
        return {number: {**figures, "responses": -1} for number, figures in real(con, iteration).items()}

    monkeypatch.setattr(analytics_live, "response_figures", without_responses)


@pytest.mark.parametrize("iteration", [None, 2])
def test_figures_from_responses_equal_figures_walked_from_the_trees(study_url, monkeypatch, iteration):
    with analytics.connect(study_url) as con:
        from_responses = analytics.stats(con, iteration)
    with analytics.connect(study_url) as con:
        # the same figures from the pairs already read for every iteration (the report's order)
        analytics.stats(con)
        assert_close(analytics.stats(con, iteration), from_responses)
    with analytics.connect(study_url) as con:
        distributions = analytics.pair_distributions(con)
        sample = analytics.pair_sample(con, 4)
        with monkeypatch.context() as patch:
            _walk_the_trees(patch)
            walked = analytics.stats(con, iteration)
            walked_distributions = analytics.pair_distributions(con)
            walked_sample = analytics.pair_sample(con, 4)
    assert [it["iteration"] for it in from_responses["iterations"]] == ([1, 2] if iteration is None else [2])
    assert all(it["pairs"] and it["final_mean_words"] and it["truncated_responses"]
               for it in from_responses["iterations"])
    assert_close(from_responses, walked)
    assert_close(distributions, walked_distributions)
    # The walk has one more column (the per-sentence reward, which responses do not sum).
    assert_close(sample, [{k: v for k, v in row.items() if k in sample[0]} for row in walked_sample])
    assert len(sample) == 4 and {row["iteration"] for row in sample} == {1, 2}


def test_the_report_reads_the_paths_of_the_leaves_it_shows(study_url):
    with analytics.connect(study_url) as con:
        sample = analytics.pair_sample(con, 3)
        leaves = [row["chosen_candidate_id"] for row in sample]
        sentences = analytics.path_sentences(con, leaves)
        stored = {row[0]: (row[1], row[2]) for row in con.execute(
            "SELECT leaf_candidate_id, text, sentence_count FROM responses").fetchall()}
    assert set(sentences) == set(leaves)
    for leaf in leaves:
        path = sentences[leaf]
        assert [s["depth"] for s in path] == list(range(len(path)))
        assert ("".join(s["text"] for s in path), len(path)) == stored[leaf]
        assert word_count(stored[leaf][0]) == sum(word_count(s["text"]) for s in path)


def test_pairs_keep_the_words_of_their_texts_and_figures_count_them_where_they_do_not(study_url):
    from sqlalchemy import create_engine, text

    with analytics.connect(study_url) as con:
        stored = analytics.stats(con)
        distributions = analytics.pair_distributions(con)
    engine = create_engine(study_url)
    try:
        with engine.begin() as conn:
            rows = conn.execute(text("SELECT chosen_text, rejected_text, chosen_words, rejected_words FROM pairs")).all()
            conn.execute(text("UPDATE pairs SET chosen_words = NULL, rejected_words = NULL"))
    finally:
        engine.dispose()
    assert rows and all((w1, w2) == (word_count(t1), word_count(t2)) for t1, t2, w1, w2 in rows)
    with analytics.connect(study_url) as con:
        counted = analytics.stats(con)
        counted_distributions = analytics.pair_distributions(con)
    assert_close(counted, stored)
    assert_close(counted_distributions, distributions)


def test_ri_histograms_bin_the_pairs_as_matplotlib_does(study_url):
    numpy = pytest.importorskip("numpy")
    with analytics.connect(study_url) as con:
        histograms = analytics.ri_histograms(con, bins=7)
        distributions = analytics.pair_distributions(con)
    assert [h["iteration"] for h in histograms] == list(range(1, ITERATIONS + 1))
    for histogram in histograms:
        pairs = [p for p in distributions if p["iteration"] == histogram["iteration"]]
        chosen = [p["chosen_mean_r_i"] for p in pairs]
        rejected = [p["rejected_mean_r_i"] for p in pairs]
        low, high = min(chosen + rejected), max(chosen + rejected)
        assert low < high
        for side, values in (("chosen", chosen), ("rejected", rejected)):
            counts, edges = numpy.histogram(values, bins=7, range=(low, high))
            assert histogram[side] == counts.tolist()
            assert histogram["edges"] == pytest.approx(edges.tolist(), rel=1e-12)


class _Recorder:
    """The DuckDB connection, with every statement kept."""

    def __init__(self, con):
        self._con = con
        self.statements: list[str] = []

    def execute(self, sql, *args):
        self.statements.append(sql)
        return self._con.execute(sql, *args)


_STORE_QUERY = re.compile(r"(?:sqlite|postgres)_query\('store', '((?:[^']|'')*)'\)")
# (the store queries name responses r, rc and rr)
_FULL_SCAN = re.compile(r"\bSCAN (candidates|responses|r|rc|rr)\b(?! USING COVERING INDEX)")
# A pair's response figures come from ix_responses_pair_figures alone (revision 0009).
_RESPONSE_ROW = re.compile(r"\bSEARCH (rc|rr) USING (?!COVERING INDEX ix_responses_pair_figures)")


def test_no_query_reads_every_candidate_or_response(study_url):
    with analytics.connect(study_url) as con:
        recorder = _Recorder(con)
        analytics_figures.stats(recorder, None)
        analytics_figures.stats(recorder, 2)
        analytics_figures.pair_distributions(recorder)
        analytics_figures.ri_histograms(recorder)
        sample = analytics_figures.pair_sample(recorder, 3)
        analytics_figures.path_sentences(recorder, [row["rejected_candidate_id"] for row in sample])
    store_queries = []
    for statement in recorder.statements:
        store_queries += [query.replace("''", "'") for query in _STORE_QUERY.findall(statement)]
        # What DuckDB itself reads: never the candidates or responses views (a scan of the whole table).
        duckdb_side = _STORE_QUERY.sub("", statement)
        assert not re.search(r"\b(FROM|JOIN)\s+(candidates|responses)\b", duckdb_side, re.IGNORECASE), statement
    assert store_queries
    if not study_url.startswith("sqlite"):
        return
    conn = sqlite3.connect(study_url.removeprefix("sqlite:///"))
    try:
        for query in store_queries:
            plan = "\n".join(row[-1] for row in conn.execute(f"EXPLAIN QUERY PLAN {query}"))
            assert not _FULL_SCAN.search(plan), f"{query}\n{plan}"
            assert not _RESPONSE_ROW.search(plan), f"{query}\n{plan}"
    finally:
        conn.close()
